import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
