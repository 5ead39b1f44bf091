"""Input data: image folders with label maps, the generated demo faces, benchmark presets."""
