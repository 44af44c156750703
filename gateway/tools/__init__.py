"""Tools beside the gateway: the trade-off lab (`modelyard bench`), parity, convert and `up`.

Nothing on the serving path imports this package; the tools start or call a gateway instead.
"""
