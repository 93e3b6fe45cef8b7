"""The run folder on disk and everything that reads it back: its layout (``layout``), finding checkpoints
(``checkpoints``), what the run chose on validation (``choices``), checkpoint integrity against the model card
(``integrity``) and exact resume in place (``resume``). Below models and evaluation: it knows files, not nets."""
