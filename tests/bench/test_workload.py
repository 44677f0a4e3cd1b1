"""What the benchmark measures (bench/workload.py): each preset's sizes and shapes."""

from __future__ import annotations

from zforcing_cli.bench.synthetic import bench_dataset
from zforcing_cli.bench.workload import DEFAULT_SIZES, bench_configs


def test_presets_measure_the_papers_shapes(tmp_path):
    sizes = {}
    for preset in DEFAULT_SIZES:
        model, train = bench_configs(DEFAULT_SIZES[preset], bench_dataset(preset, tmp_path).meta)
        sizes[preset] = (model.modality, model.input_size, model.embed_size, model.hidden_size, model.latent_size,
                         model.mlp_size, train.batch_size)
        assert train.aux_weight > 0 and train.bwd_weight > 0  # every head trains
    assert sizes == {
        "mnist": ("binary", 2, 16, 64, 16, 64, 32),  # the small preset
        "timit": ("frames", 200, 512, 1024, 256, 512, 32),
        "blizzard": ("frames", 200, 1024, 2048, 256, 1024, 128),
        "imdb": ("tokens", 16004, 300, 500, 64, 500, 32),
    }
