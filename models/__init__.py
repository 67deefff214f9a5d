"""Models shipped with the project (models/lv-tiny) and the recipe that makes them (models/recipe.py)."""
