"""Pictures a person looks at: masks, overlays, uncertainty maps, figures."""
