"""Generation: diffusers pipelines over a ModelBundle, with the A1111 prompt syntax routed to plugins."""
