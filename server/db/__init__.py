"""Persistence: typed models, the engine, the repository and the migrations."""
