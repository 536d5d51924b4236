"""Similarity measures on hand-built wirings with known answers, and on real models."""

import pytest
import torch

from synthprune import SparseMLP, residual_network, save_residual, sparse_layers
from synthprune.compare import Structure, load_snapshot, save_snapshot, similarity


def structure(edges_per_layer, widths, name="s"):
    keys = [torch.tensor(sorted(o * widths[i] + j for o, j in edges), dtype=torch.long)
            for i, edges in enumerate(edges_per_layer)]
    return Structure(name, widths, keys, [True] * len(keys))


WIDTHS = [4, 3, 2]
A = [[(0, 0), (0, 1), (1, 1), (1, 2), (2, 3)], [(0, 0), (1, 1), (1, 2)]]


def test_identical_networks_are_fully_similar():
    result = similarity(structure(A, WIDTHS), structure(A, WIDTHS))
    for value in (result.input_jaccard, result.edge_jaccard, result.edge_overlap, result.matched_edge_jaccard,
                  result.matched_edge_overlap):
        assert value == 1.0
    assert result.nnstd == 0.0


def test_disjoint_networks_share_nothing():
    b = [[(0, 2), (0, 3), (1, 0), (2, 1)], [(0, 1), (1, 0), (0, 2)]]
    result = similarity(structure(A, WIDTHS), structure(b, WIDTHS), match="none", residual=False)
    assert result.layers[0].edge_jaccard == 0.0 and result.layers[1].edge_jaccard == 0.0
    assert result.edge_overlap == 0.0 and result.matched_edge_jaccard is None


def test_permuted_hidden_neurons_match_exactly():
    permutation = {0: 2, 1: 0, 2: 1}  # hidden neuron i of A is neuron permutation[i] of B
    b = [[(permutation[o], i) for o, i in A[0]], [(o, permutation[i]) for o, i in A[1]]]
    result = similarity(structure(A, WIDTHS), structure(b, WIDTHS))
    assert result.edge_jaccard < 0.5  # raw: the numbering differs
    assert result.matched_edge_jaccard == 1.0 and result.matched_edge_overlap == 1.0 and result.nnstd == 0.0
    assert result.input_jaccard == 1.0  # the same input features survive


def test_known_values():
    # layer 1: A = {(0,0), (0,1), (1,1), (1,2), (2,3)}, B drops (2,3) and adds (2,0): 4 shared of 6
    b = [[(0, 0), (0, 1), (1, 1), (1, 2), (2, 0)], A[1]]
    result = similarity(structure(A, WIDTHS), structure(b, WIDTHS), match="none", residual=False)
    assert result.layers[0].edge_jaccard == pytest.approx(4 / 6)
    assert result.layers[0].edge_overlap == pytest.approx(4 / 5)
    assert result.layers[0].node_jaccard == pytest.approx(3 / 4)  # input 3 is used by A only
    assert result.edge_jaccard == pytest.approx((4 + 3) / (6 + 3))  # pooled over both layers


def test_different_architectures_are_refused_with_both_names():
    with pytest.raises(ValueError, match=r"left has layer sizes \[4, 3, 2\] but right has \[4, 5, 2\]"):
        similarity(structure(A, WIDTHS, "left"), structure([A[0], A[1]], [4, 5, 2], "right"))


def test_models_residual_folders_and_snapshots_agree(tmp_path):
    a = SparseMLP([30, 20, 20, 5], epsilon=1, seed=1).eval()
    b = SparseMLP([30, 20, 20, 5], epsilon=1, seed=2).eval()
    direct = similarity(a, b)
    save_residual(residual_network(a)[0], tmp_path / "ra")
    save_residual(residual_network(b)[0], tmp_path / "rb")
    from_folders = similarity(tmp_path / "ra", tmp_path / "rb")
    save_snapshot(a, tmp_path / "a.safetensors", epoch=3)
    save_snapshot(b, tmp_path / "b.safetensors", epoch=3)
    from_snapshots = similarity(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    for other in (from_folders, from_snapshots):
        assert [layer.edge_jaccard for layer in other.layers] == [layer.edge_jaccard for layer in direct.layers]
        assert other.matched_edge_jaccard == pytest.approx(direct.matched_edge_jaccard)
        assert other.nnstd == pytest.approx(direct.nnstd)
    assert 0 <= direct.edge_jaccard <= direct.matched_edge_jaccard <= 1  # matching can only help here
    assert load_snapshot(tmp_path / "a.safetensors").widths == [30, 20, 20, 5]
    assert similarity(a, a).matched_edge_jaccard == 1.0


def test_residual_comparison_ignores_dead_neurons():
    a = SparseMLP([6, 4, 2], epsilon=1, seed=0, dense_output=False)
    b = SparseMLP([6, 4, 2], epsilon=1, seed=0, dense_output=False)
    (_, fc1), (_, fc2) = sparse_layers(b)
    # B adds a connection into a hidden neuron that has no outputs: not part of its residual network
    dead = [h for h in range(4) if h not in set(fc2.edge_index()[1].tolist())]
    if dead:
        free = [k for k in range(dead[0] * 6, dead[0] * 6 + 6) if k not in set(fc1.keys().tolist())]
        keys = torch.cat([fc1.keys(), torch.tensor(free[:1])]).sort().values
        fc1.set_connections(keys, torch.ones(keys.numel()))
    assert similarity(a, b).edge_jaccard == 1.0


def test_similarity_command(tmp_path, capsys):
    import json

    from synthprune.cli import main

    quick = ["train", "--preset", "digits-mlp", "--epochs", "3", "--quiet", "--no-plots"]
    for seed in (0, 1):
        out = str(tmp_path / f"r{seed}")
        assert main([*quick, "--seed", str(seed), "--save-topology-every", "1", "--out", out]) == 0
    capsys.readouterr()
    r0, r1 = str(tmp_path / "r0"), str(tmp_path / "r1")
    assert main(["similarity", r0, r1]) == 0
    assert "NNSTD" in capsys.readouterr().out
    assert main(["similarity", r0, r1, "--json", "--match", "none"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    result = json.loads(captured.out)
    assert result["matched_edge_jaccard"] is None and 0 <= result["edge_jaccard"] <= 1
    assert main(["similarity", r0, r1, r0, "--out", str(tmp_path / "m")]) == 0
    rows = (tmp_path / "m" / "similarity.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].split(",")[1] == "1.000000"  # r0 with itself
    assert (tmp_path / "m" / "similarity.png").is_file()
    capsys.readouterr()
    assert main(["similarity", r0, "--over-epochs", "--json"]) == 0
    epochs = json.loads(capsys.readouterr().out)
    assert [row["epoch"] for row in epochs] == [0, 1, 2, 3] and epochs[-1]["vs_final"] == 1.0
    assert main(["similarity", r0]) == 2
    assert "two or more runs" in capsys.readouterr().err
    assert main(["train", "--preset", "digits-mlp", "--epochs", "1", "--quiet", "--no-plots", "--epsilon", "2",
                 "--config", str(_hidden(tmp_path)), "--out", str(tmp_path / "other")]) == 0
    assert main(["similarity", r0, str(tmp_path / "other")]) == 2
    assert "similarity needs the same architecture" in capsys.readouterr().err


def _hidden(tmp_path):
    path = tmp_path / "hidden.yaml"
    path.write_text("hidden: [64, 32]\n")
    return path


def test_a_snapshot_is_the_same_bytes_whichever_process_writes_it(tmp_path):
    # safetensors writes its metadata in a per-process random order; collecting unchanged run
    # records again rewrote every wiring file. Three processes, one wiring: one file content.
    import subprocess
    import sys

    script = ("import sys, torch; from synthprune import SparseMLP; from synthprune.compare import save_snapshot; "
              "save_snapshot(SparseMLP([12, 9, 4], epsilon=2, seed=0), sys.argv[1], epoch=3)")
    paths = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({path.read_bytes() for path in paths}) == 1
    loaded = load_snapshot(paths[0])
    assert loaded.widths == [12, 9, 4]
