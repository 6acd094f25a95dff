"""Models and tokenizers, one module per job (importing this package loads none of them):

- ``load``: model sources ('embedded', 'tiny:<arch>', GGUF, a directory, a hub id), tokenizers,
  ``load_model`` / ``load_model_config`` and the attention kernel a source is loaded with.
- ``structure``: where things are in any decoder family (layer stack, attention capture sites,
  MLPs), the sizes a model states (layers, context, vocabulary), ``check_supported``.
- ``adapters``: PEFT adapters (LoRA, IA3, prompt and prefix tuning) or full fine-tuning; saving
  and attaching a trained student.
- ``placement``: the device-map planner (one model over several devices).
- ``fastpaths``: the last-position MLP and last-query attention patches of transformers, each
  proven once against the plain forward, and the rounding bound the proofs use.
- ``decode``: token ids, length-sorted batches, the pad id and the last-position logits switch
  shared by extraction, evaluation and training.
- ``dtypes``: the one table of dtype names.
- ``tiny``: tiny tokenizers and random-weight models of every decoder family (tests, benchmarks).
- ``embedded``: the embedded default model (shipped in ``ia2dist/assets/``, else pretrained once).
- ``gguf``: GGUF files as a model source (dequantized once, cached as safetensors).
- ``weights``: reading safetensors tensors a byte range at a time (lean and ZeRO-3 loading).
"""
