"""The machine probe every `spotline bench` mode starts with: the CPU's ISA flags as
/proc/cpuinfo lists them, its model name, positive matmul peaks measured in this process through
torch and OpenVINO, the threads, and the load average before and after; printed first and
written into the bench's JSON. Figures only: no rate is asserted beyond being positive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from spotline.bench.probes import end_load, probe_cpu, probe_lines
from spotline.stages.backends.cpu import ISA_FLAGS, parse_cpuinfo

# The first processor of an Intel Sapphire Rapids machine (trimmed), and of one without
# AVX-512 or AMX.
AMX_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""
AVX2_CPUINFO = """processor\t: 0
model name\t: AMD Ryzen 5 3600
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_flags_are_parsed_from_cpuinfo() -> None:
    amx = parse_cpuinfo(AMX_CPUINFO)
    assert amx.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert amx.isa() == {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False,
                         "avx512_bf16": True, "amx_bf16": True, "amx_int8": True,
                         "amx_tile": True}
    assert (amx.bf16, amx.int8) == ("amx_bf16", "amx_int8")  # AMX first
    plain = parse_cpuinfo(AVX2_CPUINFO)
    assert plain.model == "AMD Ryzen 5 3600" and plain.isa()["avx2"]
    assert (plain.bf16, plain.int8) == ("", "")
    assert plain.signature() != amx.signature()


def _this_machines_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def probe() -> dict:
    return probe_cpu()


def test_probe_reports_this_machine(probe: dict) -> None:
    flags = _this_machines_flags()
    assert probe["isa"] == {f: f in flags for f in ISA_FLAGS}
    assert probe["cpu_model"] and probe["threads"] >= 1
    peaks = probe["peaks"]
    for key in ("torch_fp32_gflops", "torch_bf16_gflops", "openvino_f32_gflops",
                "openvino_bf16_gflops", "openvino_int8_gops"):
        assert peaks[key] > 0, (key, peaks)
    assert peaks["openvino_bf16_runs_as"] in ("bf16", "f32")
    assert len(probe["load_avg_before"]) == 3 and probe["probe_s"] > 0
    lines = probe_lines(probe)
    assert lines[0].startswith(f"machine: {probe['cpu_model']}")
    assert "matmul peaks" in lines[1] and "torch fp32" in lines[1] and "OpenVINO f32" in lines[1]
    assert lines[-1].startswith("load average before:")
    assert end_load(probe).startswith("load average after:")
    assert len(probe["load_avg_after"]) == 3


def test_bench_prints_the_probe_and_writes_it_to_json(data_dir: Path, tmp_path: Path) -> None:
    """The fastest run (`bench stream --only transport`) through the real CLI: the probe comes
    first, the load average after comes last, and the JSON report carries the probe."""
    from spotline.cli import cli

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli, ["bench", "stream", "--only", "transport", "--iterations", "5", "--json", str(out)],
        env={"SPOTLINE_DATA_DIR": str(data_dir)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("machine: ") and "matmul peaks" in lines[1]
    assert any(line.startswith("load average before:") for line in lines[:4])
    assert lines[-1].startswith("load average after:")
    report = json.loads(out.read_text())
    assert "transport" in report
    assert report["probe"]["isa"] == probe_cpu(matmul=False)["isa"]
    assert report["probe"]["peaks"]["torch_fp32_gflops"] > 0
    assert len(report["probe"]["load_avg_after"]) == 3


def test_every_bench_subcommand_has_its_options_and_the_probe(data_dir: Path) -> None:
    """`spotline bench --help` lists the six subcommands, each with its own options in its
    --help; `bench soak` (with MINUTES missing, the fastest way through its callback) prints
    the probe first and the load average last, as every subcommand but gpu, which records
    them as its first section."""
    from spotline.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["bench", "--help"], catch_exceptions=False).output
    own = {"stream": "--only", "real": "--real-frames", "backends": "--part", "soak": "--rate",
           "video": "--in-process", "gpu": "--device"}
    for name, option in own.items():
        assert f"  {name} " in listed, listed
        text = runner.invoke(cli, ["bench", name, "--help"], catch_exceptions=False).output
        assert option in text and f"bench {name} [OPTIONS]" in text, text
    result = runner.invoke(cli, ["bench", "soak"], env={"SPOTLINE_DATA_DIR": str(data_dir)})
    assert result.exit_code == 2 and "give MINUTES" in result.output, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("machine: ") and "matmul peaks" in lines[1]
    assert any(line.startswith("load average after:") for line in lines)


def test_bench_gpu_records_the_probe_first(tmp_path: Path) -> None:
    """`spotline bench gpu` (which probes by itself): the probe is its first section, with the load
    average after the run."""
    from spotline.bench import gpu as bench_gpu
    from spotline.common.settings import load_settings

    settings = load_settings(env={}, data_dir=str(tmp_path / "data"), models="tiny")
    report = bench_gpu.run(settings, "cpu", real=False, runs=1, frames=1, rounds=1,
                           out=tmp_path / "out", budget_s=120, sections=())
    sections = report["sections"]
    assert list(sections)[:3] == ["run", "probe", "environment"]  # after the options
    assert sections["probe"]["peaks"]["openvino_f32_gflops"] > 0
    assert len(sections["probe"]["load_avg_after"]) == 3
    assert "machine: " in (tmp_path / "out" / "gpu.txt").read_text()
