"""Ray Data pipelines around the gen1 model library: preprocess, edit, evaluate."""
