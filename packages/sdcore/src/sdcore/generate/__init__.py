"""Generation: diffusers pipelines over a ModelBundle, with the A1111 prompt syntax routed to plugins.

Modules (each import-light; torch and diffusers are imported inside functions):

- :mod:`.prompt_syntax`: ``<tag:name:w>`` network tags and ``(emphasis:1.2)`` / ``[less]`` / ``BREAK``;
- :mod:`.conditioning`: prompt -> conditioning with emphasis, 75-token chunks and clip skip;
- :mod:`.pipeline`: ``build_pipeline`` and ``generate_images`` (A1111 sampler names);
- :mod:`.rng`: every noise drawn in float32 on the CPU generators, then the model's dtype (A1111's);
- :mod:`.networks`: the handler contract plugins implement; :mod:`.session` routes tags to them;
- :mod:`.pnginfo`: the A1111 ``parameters`` PNG text chunk.
"""
