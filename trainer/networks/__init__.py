"""LyCORIS networks: building, parameter groups, block control, files and metadata."""
