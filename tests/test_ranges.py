"""poslsh.attention.ranges, checked once against the dense float64 weights (``dense_log_weights``) and
``Partitions.block_bounds()``: every key with a nonzero weight lies in its tile's range, every key of
the full part has a nonzero weight for every row of the tile (lsh: collision count r), and with one-row
tiles both are exact (so the ranges are not merely safe but tight). Then the summaries (pairs per
query, split pairs, computed tiles) and the committed results they must regenerate bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from poslsh import alibi_slopes, sample_partitions
from poslsh.attention.dispatch import resolve_spec
from poslsh.attention.ranges import (Support, block_bounds_at, computed_tiles, key_ranges, key_tiles,
                                     nonzero_pairs, query_ranges, split_pairs)
from poslsh.attention.reference import dense_log_weights

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
CPU = torch.device("cpu")
# A flat head (one block, window = everything), a wide one, and two narrow ones (many blocks).
SLOPES = torch.tensor([0.0, 0.08, 0.4, 1.5], dtype=torch.float64)
WINDOW = torch.tensor([50, 6, 0, 2])  # hybrid near fields set by hand: inside, across and beyond blocks

CASES = [("exact", None), ("window", None), ("window", "asymmetric"), ("lsh", "grid"), ("lsh", "cut"), ("hybrid", "grid"),
         ("hybrid", "cut")]
RIGHT = torch.tensor([3, 0, 9, 1])  # the band's right sides where they differ from the left (FlashAttention's)
LENGTHS = [(37, 37), (13, 70), (1, 45), (33, 33)]  # odd, Nq < Nk, decoding, 2^5 + 1


def make_spec(method, scheme, causal, nq, nk, seed=0):
    q, k = torch.zeros(1, 4, nq, 4, dtype=torch.float64), torch.zeros(1, 4, nk, 4, dtype=torch.float64)
    if scheme == "asymmetric":  # the left sides below, these right sides (FlashAttention's window_size)
        return resolve_spec(q, k, k, slopes=SLOPES, causal=causal, window_size=(WINDOW * 4, RIGHT))
    spec = resolve_spec(q, k, k, slopes=SLOPES, causal=causal, method=method, samples=3, scheme=scheme or "grid",
                        window_eps=0.2, generator=torch.Generator().manual_seed(seed))
    if method == "window":  # a zero-width head too
        spec = dataclasses.replace(spec, window=torch.minimum(spec.window, WINDOW * 4))
    return dataclasses.replace(spec, window=WINDOW) if method == "hybrid" else spec


def weights(spec, nq, nk):
    """(nonzero [H, nq, nk], plain [H, nq, nk]): plain = nonzero with the weight given by the score alone
    (the band's exact weight, or every sample colliding)."""
    logw = dense_log_weights(spec, nq, nk, CPU)
    nonzero = torch.isfinite(logw)
    if spec.method in ("exact", "window"):
        return nonzero, nonzero
    all_r = spec.partitions.mean_mask()[:, spec.q_offset:, :] == 1.0  # r / r is exact in float64
    plain = nonzero & all_r
    if spec.method == "hybrid":
        d = (torch.arange(nq)[:, None] + spec.q_offset - torch.arange(nk)[None, :]).abs()
        plain = plain | (nonzero & (d[None] <= spec.window[:, None, None]))
    return nonzero, plain


def covered(r, count, cols, block):
    """[H, count, cols] bools: column inside the tile's [lo, hi) and inside its [flo, fhi), tiles of
    ``block`` rows expanded to rows."""
    tile = torch.arange(count) // block
    j = torch.arange(cols)
    inside = (j >= r.lo[:, tile, None]) & (j < r.hi[:, tile, None])
    full = (j >= r.flo[:, tile, None]) & (j < r.fhi[:, tile, None])
    return inside.expand(4, -1, -1), full.expand(4, -1, -1)


def check_order(r, top):
    assert (r.lo >= 0).all() and (r.lo <= r.flo).all() and (r.flo <= r.fhi).all() and (r.fhi <= r.hi).all()
    assert (r.hi <= top).all()


@pytest.mark.parametrize("method,scheme", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", LENGTHS)
def test_ranges_hold_every_nonzero_weight(method, scheme, causal, nq, nk):
    spec = make_spec(method, scheme, causal, nq, nk)
    nonzero, plain = weights(spec, nq, nk)
    for block in (1, 5, 16):
        r = key_ranges(spec, nq, nk, block)
        check_order(r, nk)
        inside, full = covered(r, nq, nk, block)
        assert not (nonzero & ~inside).any(), f"nonzero weight outside the key range (block {block})"
        assert not (full & ~plain).any(), f"full part holds a masked or partial pair (block {block})"
        if block == 1:  # one row: the range is the row's nonzero keys, the full part its plain keys
            assert torch.equal(inside, nonzero) and torch.equal(full, plain)
        # the transpose: query rows per key tile
        rq = query_ranges(spec, nq, nk, block)
        check_order(rq, nq)
        inside_q, full_q = covered(rq, nk, nq, block)
        assert not (nonzero.transpose(1, 2) & ~inside_q).any()
        assert not (full_q & ~plain.transpose(1, 2)).any()
        if block == 1:
            assert torch.equal(inside_q, nonzero.transpose(1, 2)) and torch.equal(full_q, plain.transpose(1, 2))


def test_full_parts_are_found():
    """The safe answer (no full part anywhere) would pass the test above: the full parts must be there."""
    for method, scheme in CASES:
        spec = make_spec(method, scheme, False, 70, 70)
        r = key_ranges(spec, 70, 70, 4)
        assert (r.fhi > r.flo).any() and (r.hi - r.lo < 70).any() or method == "exact", method


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_block_bounds_at_matches_block_bounds(scheme):
    slopes = torch.tensor([0.0, 0.01, 0.3, 3.0, 20.0], dtype=torch.float64)  # one block .. every gap cut
    for n in (1, 2, 17, 300):
        parts = sample_partitions(n, slopes, 4, scheme=scheme, generator=torch.Generator().manual_seed(n))
        start, end = parts.block_bounds()
        for pos in (torch.arange(n), torch.tensor([0, n - 1]), torch.arange(0, n, 7)):  # scan and search paths
            s, e = block_bounds_at(parts, pos)
            assert torch.equal(s.long(), start[..., pos]) and torch.equal(e.long(), end[..., pos])


@pytest.mark.parametrize("method,scheme", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_pair_counts(method, scheme, causal):
    nq, nk = 29, 41
    spec = make_spec(method, scheme, causal, nq, nk, seed=1)
    nonzero, _ = weights(spec, nq, nk)
    assert nonzero_pairs(spec, nq, nk).tolist() == nonzero.sum((1, 2)).tolist()
    if method == "lsh":
        masks = spec.partitions.dense_masks()[:, :, nk - nq:, :]  # [H, r, nq, nk]
        if causal:
            masks = masks & nonzero[:, None]
        assert split_pairs(spec, nq, nk).tolist() == masks.sum((1, 2, 3)).tolist()


@pytest.mark.parametrize("method,scheme", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_computed_tiles_walk(method, scheme, causal):
    """Visited tiles hold every nonzero pair; plain (interior) tiles hold only plain pairs and lie inside
    the keys (the kernels load them unmasked); the counts add up."""
    nq, nk, bm, bn = 37, 70, 8, 16
    spec = make_spec(method, scheme, causal, nq, nk, seed=2)
    nonzero, plain = weights(spec, nq, nk)
    t = key_tiles(key_ranges(spec, nq, nk, bm), bn)
    t = type(t)(*(x.expand(4, -1) for x in t))
    rows, cols = torch.arange(nq) // bm, torch.arange(nk) // bn
    visited = (cols >= t.lo[:, rows, None]) & (cols < t.hi[:, rows, None])
    interior = (cols >= t.flo[:, rows, None]) & (cols < t.fhi[:, rows, None])
    assert not (nonzero & ~visited).any() and not (interior & ~plain).any()
    assert ((t.fhi == t.flo) | (t.fhi * bn <= nk)).all()  # no ragged key tile is plain
    got = computed_tiles(spec, nq, nk, bm, bn)
    assert got["interior"] == int((t.fhi - t.flo).sum())
    assert got["boundary"] + got["interior"] == int((t.hi - t.lo).sum())
    assert got["pairs"] == (got["boundary"] + got["interior"]) * bm * bn


def test_computed_tiles_exact_causal_by_hand():
    """64 x 64 causal in 16 x 16 tiles: 10 tiles on and below the diagonal, the 4 on it need the mask."""
    spec = Support("exact", True)
    assert computed_tiles(spec, 64, 64, 16, 16) == {"boundary": 4, "interior": 6, "pairs": 10 * 256}
    assert computed_tiles(Support("exact", False), 64, 64, 16, 16) == {"boundary": 0, "interior": 16,
                                                                        "pairs": 16 * 256}


def test_committed_attn_error_pair_counts_regenerate():
    """attn-error's pair counts (now from this module) reproduce the committed JSON exactly."""
    from poslsh_lab.experiments.attn_error.measure import lsh_pairs, matched_widths, window_pairs
    from poslsh.seeds import crc32_seed

    doc = json.loads((RESULTS / "attn-error" / "attn-error.json").read_text())
    cfg, res = doc["config"], doc["results"]
    n, slopes, keys = cfg["n"], alibi_slopes(cfg["heads"]), ("pairs_fused", "pairs_split", "pairs_window",
                                                             "window_width")
    for curve in res["curves"]:
        per_seed = {key: [] for key in keys}
        for seed in range(cfg["seeds"]):
            rows = {key: [] for key in keys}
            for r in res["samples"]:
                gen = torch.Generator().manual_seed(crc32_seed(cfg["seed"], curve["logit_scale"], seed, curve["scheme"], r))
                parts = sample_partitions(n, slopes, r, scheme=curve["scheme"], generator=gen)
                union, total = lsh_pairs(parts, cfg["causal"])
                width = matched_widths(n, union, cfg["causal"])
                for key, val in zip(keys, (union, total, window_pairs(n, width, cfg["causal"]), width)):
                    rows[key].append(val.tolist())
            for key in keys:
                per_seed[key].append(rows[key])
        for key in keys:  # the experiment saves the mean over seeds, [head][r]
            assert torch.tensor(per_seed[key], dtype=torch.float64).mean(0).T.tolist() == curve[key], key


def test_committed_pareto_pairs_regenerate():
    """pareto's keys per query reproduce the committed H200 run at 64K tokens for exact, the windows, one
    hybrid and LSH r = 4 (the other points take longer than CI should and run the same code): the seed
    formula and the count are the ones the run used."""
    from poslsh_lab.experiments.metrics import keys_per_query
    from poslsh.seeds import blake2b_seed

    doc = json.loads((RESULTS / "pareto_h200" / "pareto.json").read_text())
    cfg = doc["config"]
    panel = doc["results"]["alibi"][0]
    n, heads = panel["n"], panel["heads"]
    q = torch.zeros(1, heads, n, 1)
    checked = 0
    for p in panel["points"]:
        if "pairs" not in p or (p["method"] == "lsh" and p["samples"] > 4) or \
                (p["method"] == "hybrid" and p["hybrid_eps"] != max(cfg["hybrid_eps"])):
            continue
        opts = {key: p[key] for key in ("window_eps", "sampling", "samples", "hybrid_eps") if key in p}
        draws = cfg["seeds"] if p["method"] in ("lsh", "hybrid") else 1
        pairs = []
        for draw in range(draws):
            gen = torch.Generator().manual_seed(blake2b_seed(cfg["seed"], 1, p["method"], sorted(opts.items()), draw))
            spec = resolve_spec(q, q, q, causal=cfg["causal"], method=p["method"], generator=gen,
                                slopes=alibi_slopes(heads), **opts)
            pairs.append(keys_per_query(spec, n, n))
        assert sum(pairs) / len(pairs) == p["pairs"], p
        checked += 1
    assert checked >= 11
