"""Training recipes: the settings of the book's published runs, one TOML file each (``--recipe NAME``)."""
