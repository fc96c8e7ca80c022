"""Images to graphs, following "Benchmarking Graph Neural Networks" (Dwivedi et al. 2020, arXiv 2003.00982):

- superpixel graphs: SLIC superpixels (Achanta et al. 2012, via scikit-image) as nodes with features = mean
  intensity (or colour) + normalised centroid; edges to the k = 8 nearest superpixels, weighted by
  exp(-|p_i - p_j|^2 / sigma_p^2 - |f_i - f_j|^2 / sigma_f^2), symmetrised;
- pixel-grid graphs: one node per pixel, 8-neighbour edges.

Graphs are built once, in parallel over the cores with a progress bar, and cached in data/graphs_*.pt under a
name that carries every builder setting (a cache built with other settings is never read back); a cache that does
not load or does not hold what its name says is rebuilt.
"""
import hashlib
import json
import os
import signal
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from utils import data as D
from utils import run as R

BUILDER_VERSION = 1  # bump when the builders below change what they produce: old caches are then not read


def superpixel_graph(img, max_nodes=75, k=8):
    """img: uint8 (C, H, W) -> numpy (node features (N, C + 2), edge_index (2, E), edge weights (E, 1)), N <= max_nodes.
    (numpy, not torch: worker processes hand tensors back through file descriptors and run out of them.)"""
    from skimage.segmentation import slic
    c, h, w = img.shape
    im = img.astype(np.float32) / 255.0
    n_segments = max_nodes
    while True:  # SLIC's count is approximate: ask for fewer until the cap holds
        seg = slic(im[0] if c == 1 else im.transpose(1, 2, 0), n_segments=n_segments,
                   compactness=0.25 if c == 1 else 10, channel_axis=None if c == 1 else -1, start_label=0)
        labels = np.unique(seg)
        if len(labels) <= max_nodes or n_segments <= 5:
            break
        n_segments -= 5
    seg = np.searchsorted(labels, seg)  # 0 .. N-1 without gaps
    n = len(labels)
    counts = np.bincount(seg.ravel(), minlength=n).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    pos = np.stack([np.bincount(seg.ravel(), ys.ravel(), n) / counts / h,
                    np.bincount(seg.ravel(), xs.ravel(), n) / counts / w], 1)  # centroids in [0, 1]
    feat = np.stack([np.bincount(seg.ravel(), im[ch].ravel(), n) / counts for ch in range(c)], 1)
    d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    kk = min(k, n - 1)
    if kk <= 0:  # a single superpixel: no edges
        return (np.concatenate([feat, pos], 1).astype(np.float32), np.zeros((2, 0), np.int64),
                np.zeros((0, 1), np.float32))
    nbrs = np.argsort(d_pos + np.eye(n) * 1e9, axis=1)[:, :kk]
    src = np.repeat(np.arange(n), kk)
    dst = nbrs.ravel()
    pairs = np.unique(np.concatenate([np.stack([src, dst], 1), np.stack([dst, src], 1)]), axis=0)  # symmetric
    i, j = pairs[:, 0], pairs[:, 1]
    sigma_p = np.sqrt(d_pos[i, j].mean()) + 1e-8
    d_feat = ((feat[i] - feat[j]) ** 2).sum(-1)
    sigma_f = np.sqrt(d_feat.mean()) + 1e-8
    weight = np.exp(-d_pos[i, j] / sigma_p ** 2 - d_feat / sigma_f ** 2)
    return (np.concatenate([feat, pos], 1).astype(np.float32), pairs.T.astype(np.int64),
            weight[:, None].astype(np.float32))


def grid_graph(img):
    """The seed's pixel graph: a node per pixel (intensity + position), 8-neighbour edges with weight 1."""
    c, h, w = img.shape
    ys, xs = np.mgrid[0:h, 0:w]
    feat = np.concatenate([img.reshape(c, -1).T / 255.0, ys.reshape(-1, 1) / h, xs.reshape(-1, 1) / w], 1)
    idx = np.arange(h * w).reshape(h, w)
    edges = []
    for dy, dx in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]:
        a = idx[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        b = idx[max(0, dy):h - max(0, -dy) or None, max(0, dx):w - max(0, -dx) or None]
        edges.append(np.stack([a.ravel(), b.ravel()]))
    e = np.concatenate(edges, 1)
    return feat.astype(np.float32), e.astype(np.int64), np.ones((e.shape[1], 1), np.float32)


def _build_one(img, kind, max_nodes, k):
    return superpixel_graph(img, max_nodes, k) if kind == "superpixel" else grid_graph(img)


def _worker_init():
    """Pool workers leave Ctrl-C and SIGTERM to the parent (which may have made SIGTERM raise KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def build_graphs(x, kind="superpixel", max_nodes=75, k=8, workers=None, desc="graphs"):
    """uint8 images (N, C, H, W) -> list of numpy (x, edge_index, edge_attr), built in parallel."""
    imgs = list(x.numpy())
    workers = workers or os.cpu_count() or 1
    fn = partial(_build_one, kind=kind, max_nodes=max_nodes, k=k)
    if workers == 1 or len(imgs) < 200:
        return [fn(im) for im in R.progress(imgs, desc=desc, mininterval=2)]
    with Pool(workers, initializer=_worker_init) as pool:
        return list(R.progress(pool.imap(fn, imgs, chunksize=256), total=len(imgs), desc=desc, mininterval=2))


STORE_KEYS = ("x", "edge_index", "edge_attr", "nodes", "edges", "y", "settings")


def cache_path(cache_dir, settings):
    """data/graphs_<dataset>_<kind>_<split>[_first<N>]_<hash of every builder setting>.pt"""
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    s = settings
    return Path(cache_dir) / (f"graphs_{s['dataset']}_{s['kind']}_{s['split']}"
                              f"{'' if s['limit'] is None else '_first%d' % s['limit']}_{tag}.pt")


def read_cache(path, settings):
    """The cached store, or None (with a line saying why) when it is unreadable, incomplete or built otherwise."""
    try:
        store = torch.load(path, weights_only=True)
        ok = isinstance(store, dict) and all(k in store for k in STORE_KEYS) and store["settings"] == settings
        ok = (ok and int(store["nodes"].sum()) == len(store["x"])
              and int(store["edges"].sum()) == store["edge_index"].shape[1])
    except Exception as e:  # truncated zip, random bytes, a pickle we refuse to run
        print(f"graph cache {path} is unreadable ({type(e).__name__}): rebuilding it")
        return None
    if not ok:
        print(f"graph cache {path} does not hold what its name says: rebuilding it")
        return None
    return store


def load_graphs(dataset, split, kind="superpixel", data_dir=None, limit=None, cache_dir=D.REPO / "data", k=8,
                max_nodes=None):
    """A list of torch_geometric Data for a split (the first `limit` images), read from `cache_dir` when a cache
    built with the same settings is there (None: no cache; the synthetic sets are not cached by train.py)."""
    from torch_geometric.data import Data
    channels, size, _ = D.dataset_info(dataset)
    max_nodes = max_nodes or (75 if size == 28 else 150)
    settings = {"dataset": dataset, "split": split, "kind": kind, "limit": limit, "version": BUILDER_VERSION,
                **({"max_nodes": max_nodes, "k": k, "compactness": 0.25 if channels == 1 else 10}
                   if kind == "superpixel" else {})}
    path = None if cache_dir is None else cache_path(cache_dir, settings)
    store = read_cache(path, settings) if path is not None and path.exists() else None
    if store is None:
        x, y = D.load_images(dataset, split, data_dir)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        graphs = build_graphs(x, kind, max_nodes, k, desc=f"{dataset} {split} {kind} graphs")
        store = {"x": torch.from_numpy(np.concatenate([g[0] for g in graphs])),
                 "edge_index": torch.from_numpy(np.concatenate([g[1] for g in graphs], 1)),
                 "edge_attr": torch.from_numpy(np.concatenate([g[2] for g in graphs])),
                 "nodes": torch.tensor([len(g[0]) for g in graphs]), "edges": torch.tensor([g[1].shape[1] for g in graphs]),
                 "y": y, "settings": settings}
        if path is not None:
            R.save_checkpoint(store, path)  # atomic: an interrupted build leaves no half-written cache
    xs = store["x"].split(store["nodes"].tolist())
    es = store["edge_index"].split(store["edges"].tolist(), 1)
    eas = store["edge_attr"].split(store["edges"].tolist())
    return [Data(x=a, edge_index=b, edge_attr=c, y=store["y"][i:i + 1]) for i, (a, b, c) in enumerate(zip(xs, es, eas))]
