"""Training engines of the student loop (``ia2dist.student.trainer``).

``base``: the interface every engine implements (``Engine``) and the factory that keeps a job's
latest engine (``EngineFactory``); ``torch_engine``: the one-process engine (plain PyTorch);
``deepspeed_engine``: DeepSpeed ZeRO (the only module that imports deepspeed); ``dsconfig``: the
DeepSpeed templates filled from the run config; ``choice``: which engine a run uses and why;
``transformers_compat``: what the ZeRO-3 loader needs from transformers across versions.
"""
