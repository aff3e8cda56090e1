"""The `report` stage."""
