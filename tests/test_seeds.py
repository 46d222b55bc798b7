"""The seed formulas are pinned: the committed results were drawn with them (``poslsh.seeds``), so a
change of any formula would make them irreproducible. The expected values were computed with the
experiments' own copies of the formulas before they moved into ``poslsh.seeds``."""

from poslsh.seeds import blake2b_seed, crc32_seed, seed_for


def test_seed_for_is_pinned():  # layer partitions, the LM's training schedule
    assert seed_for(0, "train", 3, 17) == 1599534129425885216
    assert seed_for(5, 2, "grid") == 3885982780655920308
    assert seed_for(1, 0, "cut", 4) == 7135030284348658259


def test_blake2b_seed_is_pinned():  # poslsh pareto
    assert blake2b_seed(0, 1, "lsh", [("samples", 8), ("sampling", "iid")], 0) == 442912464251719607
    assert blake2b_seed(0, "qmc", 2, 16) == 2155631900634184825


def test_crc32_seed_is_pinned():  # poslsh mask-error, poslsh attn-error
    assert crc32_seed(0, 4096, 0.1, "grid", 3) == 444829860
    assert crc32_seed(0, 1.0, 1, "cut", 8) == 2911584172


def test_seeds_fit_a_torch_generator():
    import torch

    for seed in (seed_for("x"), blake2b_seed("x"), crc32_seed("x")):
        assert 0 <= seed < 2**63
        torch.Generator().manual_seed(seed)
