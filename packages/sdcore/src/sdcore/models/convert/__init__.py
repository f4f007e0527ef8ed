"""Key conversion between diffusers/transformers module names and ldm/SGM single-file names.

Each converter maps one *module key* (as ``module.state_dict()`` names it) to one file key, so the
same table serves both directions: saving walks the module's keys, loading walks them too and
fetches the file key. Block indices come from the model config, so any layout diffusers can build
(the tiny test models as well as SD1/SD2/SDXL) round-trips.
"""
