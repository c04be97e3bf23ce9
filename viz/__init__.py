"""Pure, headless visualisation: arrays in, figures / images / files out. Never imports the model."""
