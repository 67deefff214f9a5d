"""Models shipped with the project (models/series-tiny, the demo's base; models/lv-tiny, for comparison) and the
recipes that make them (models/recipe.py)."""
