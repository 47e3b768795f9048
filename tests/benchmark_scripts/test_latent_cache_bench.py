"""The latent-cache benchmark runs and reports the three timings it promises."""

from benchmarks import bench_latent_cache


def test_latent_cache_benchmark_tiny_run(tmp_path, capsys):
    csv = tmp_path / "r.csv"
    assert bench_latent_cache.main(["--tiny", "--size", "32", "--images", "2", "--repeat", "1", "--csv", str(csv)]) == 0
    rows = csv.read_text().splitlines()
    assert rows[0] == "what,seconds,size,images,batch,threads"
    assert [r.split(",")[0] for r in rows[1:]] == ["encode_all", "read_cache", "encode_batch"]
    assert all(float(r.split(",")[1]) > 0 for r in rows[1:])
    assert "| read them from latents.safetensors (a resumed run) |" in capsys.readouterr().out
