"""The trade-off lab: `modelyard bench`'s load generator, scenarios and report."""
