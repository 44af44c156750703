"""`modelyard migrate`: move a model between frameworks without touching its clients.

Steps, each one safe to run again: convert (a new deployment beside the old one, `twin_of` it),
check (parity on sample, generated or recorded inputs), shadow (a share of live traffic copied to
the new deployment and compared), status (the verdict on what the shadow saw), promote (the
model's `split` moves traffic in steps, rolled back on a regression) and report (an HTML page).
What each step did is kept in the migration's state file (`state.py`).
"""
