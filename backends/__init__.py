"""fxq's backends: placement tables and lowering to runtime formats."""
