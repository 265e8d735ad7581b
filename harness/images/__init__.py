"""Images: recipes, their builders (tiny, debian), the image store, firmware boot disks."""
