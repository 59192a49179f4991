"""``python -m pyfastdl train <model>``: the notes' models trained end to end with pyfastdl, on data
every machine has offline, against torch (``--compare torch``), on one or N processes (``--nproc``).
See docs/training.md. ``MODELS`` lists the models, ``build(name)`` gives the plain torch model and
``load_checkpoint(path)`` loads a run's checkpoint into it."""
from .loop import add_arguments, load_checkpoint, run
from .models import MODELS, build, datasets

__all__ = ["MODELS", "build", "datasets", "add_arguments", "run", "load_checkpoint"]
