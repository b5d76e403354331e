"""Lightning loggers as this project configures them, and what a run records about itself in them."""
