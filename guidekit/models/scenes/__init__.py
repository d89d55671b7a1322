"""A text-conditioned bundled model of captioned shape scenes: work in progress (issue 13).

A seeded procedural data set of small RGB scenes with captions and attribute labels
(:mod:`.data`), a fixed-vocabulary tokenizer (:mod:`.tokenizer`) and a small learned token
encoder (:mod:`.encoder`), a tiny diffusers PixArt denoiser with cross-attention over the
caption tokens (:mod:`.denoiser`, :mod:`.model`), an attribute classifier for
prompt-adherence metrics (:mod:`.classifier`), their training entry point (``python -m
guidekit.models.scenes.train``), guided sampling (:mod:`.sample`) and the adherence
measurement (``python -m guidekit.models.scenes.evaluate``). The shipped weights load with
``model.load_scene_model()`` and ``classifier.load_scene_classifier()``. See docs/models.md.
Importing this package is cheap; diffusers is imported when a model is built.
"""
