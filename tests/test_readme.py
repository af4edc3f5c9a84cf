"""Every command README.md and docs/*.md show runs here, on the tiny models: real model paths are pointed at tiny
pipelines and checkpoints saved by the same code, sizes and sample counts made small, GPU-only or network-only steps
run up to the one-line error that says what they need. A command added to a page without a way to run it here fails
this test (see ``PLANS``). The README stays short (at most ``README_MAX_LINES`` lines) and every relative link of
the pages reaches a file (and a heading, for links into a markdown file)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_flux import IMAGE_SIZE, TEXT_TOKENS, save_tiny_flux  # noqa: E402
from tiny_hunyuan import save_tiny_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# The pages in the order their commands run: a page's <run> placeholders are filled with run folders the commands
# of the pages before it made (the models' pages sample what metrics.md evaluates). Pages not listed run last.
DOCS_ORDER = ["method", "configuration", "dit", "flux", "hunyuan_video", "reproducing", "schedules", "metrics",
              "distributed", "any_model", "performance", "memory", "tests"]
README_MAX_LINES = 300


def doc_pages() -> list[Path]:
    """README.md, then every docs/*.md (DOCS_ORDER first)."""
    docs = {p.stem: p for p in sorted((ROOT / "docs").glob("*.md"))}
    return [ROOT / "README.md"] + [docs.pop(name) for name in DOCS_ORDER if name in docs] + list(docs.values())


def bash_commands(text: str) -> list[str]:
    """Every shell command of a page's ```bash blocks (comments dropped, continuations joined, in order)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            out, quote = "", None
            for i, ch in enumerate(line):  # cut a trailing comment: '#' after a space, outside quotes
                if quote:
                    quote = None if ch == quote else quote
                elif ch in "'\"":
                    quote = ch
                elif ch == "#" and (i == 0 or line[i - 1].isspace()):
                    break
                out += ch
            if out.strip():
                commands.append(" ".join(out.split()))
    return commands


def readme_commands() -> list[str]:
    """Every shell command of README.md and docs/*.md, each once, in the order of ``doc_pages``."""
    return list(dict.fromkeys(c for page in doc_pages() for c in bash_commands(page.read_text())))


@dataclass
class Plan:
    """How a README command runs here: extra words appended (later Hydra overrides win), words replaced, and
    what it must do: exit 0, or fail with status != 0 and one error line containing ``error``."""

    pattern: str
    append: str = ""
    replace: tuple[tuple[str, str], ...] = ()
    error: str | None = None
    external: str | None = None  # not this project's command (network installers): why it is not run

    def matches(self, command: str) -> bool:
        return re.fullmatch(self.pattern, command) is not None


TINY_DIT = ("model.name=DiT-Tiny/2 model.image_size=64 model.num_classes=1000 model.ckpt_dir={dit} "
            "model.vae={dit}/vae")
TINY_FLUX = (f"model.path={{flux}} height={IMAGE_SIZE} width={IMAGE_SIZE} max_sequence_length={TEXT_TOKENS} "
             "num_steps=8 device=cpu warmup=false progress=false")
TINY_HV = ("model.path={hv} height=32 width=32 num_frames=5 max_sequence_length=8 num_steps=6 device=cpu "
           "warmup=false progress=false videos_per_prompt=2")

PLANS = [
    # installers and tools of other projects, which need the network
    Plan(r"mkdir -p pretrained_models && wget .*", external="downloads the real DiT-XL/2 checkpoint"),
    Plan(r"huggingface-cli .*", external="logs in to / downloads from the Hugging Face hub"),
    Plan(r"pip install .*", external="installs a package from PyPI"),
    Plan(r"apt-get install .*", external="installs Debian's Slurm (.ci/run does it for CI)"),
    Plan(r"bash scripts/setup_eval_envs.sh .*", external="builds a metric environment from PyPI (~1 GB); its "
         "runner protocol is tested in tests/test_eval_external.py"),
    Plan(r"bash scripts/test.sh.*", external="the test suite itself"),
    Plan(r"NPROC=\d bash scripts/sample_flux.sh (parallel|out_root=/tmp/cp-gpu).*",
         external="context parallelism on GPUs with the FLUX.1-dev weights (the prepared multi-GPU check)"),
    # context parallelism on gloo CPU ranks (docs/context_parallel.md)
    Plan(r"NPROC=\d bash scripts/sample_flux.sh model=digits_flux .*parallel\.ulysses=2.*"),
    Plan(r"python -m taylorseer\.harness\.launch --standalone --nproc_per_node 2 tests/cp_worker\.py .*"),
    Plan(r"python -m taylorseer\.attach\.parallel_cost.*"),
    # any model (docs/any_model.md): a class it builds itself, and a saved transformer folder
    Plan(r"python -m taylorseer\.attach\.discover my_transformer/",
         replace=(("my_transformer/", "{flux}/transformer"),)),
    Plan(r"python -m taylorseer\.attach\.discover \w+"),
    # what a batch user can rely on (docs/run_folders.md)
    Plan(r"bash scripts/sample_dit_ddp.sh model=digits num_samples=30 num_steps=50 run_name=digits-nocache",
         error="holds outputs made with other settings"),
    Plan(r"bash scripts/sample_dit_ddp.sh model=digits .*", append="progress=false"),
    Plan(r"bash scripts/eval.sh digits runs/dit_fid/digits-n4 --reference runs/dit_fid/digits-ref"),
    Plan(r"bash scripts/sweep.sh digits num_samples=-5", error="nothing was launched"),
    Plan(r"bash scripts/sweep.sh digits num_samples=30 batch_size=30"),
    # the main jobs
    Plan(r"bash scripts/demo.sh.*", append="num_samples=20 batch_size=20 intervals=[4] orders=[1] progress=false"),
    Plan(r"bash scripts/sample_dit.sh model=digits.*", append="progress=false"),
    Plan(r"bash scripts/sample_flux.sh model=digits_flux.*", append="progress=false warmup=false num_steps=20"),
    Plan(r"bash scripts/sample_dit.sh.*", append=TINY_DIT + " progress=false"),
    Plan(r"NPROC=8 bash scripts/sample_dit_ddp.sh.*", replace=(("NPROC=8", "NPROC=2"),),
         append=TINY_DIT + " num_samples=6 batch_size=2 num_steps=6 progress=false"),
    Plan(r"bash scripts/sample_flux.sh .*cpu_offload=true.*", append=TINY_FLUX,
         error="cpu_offload=true moves models to and from a CUDA device"),
    Plan(r"NPROC=8 bash scripts/sample_flux.sh.*", replace=(("NPROC=8", "NPROC=2"),), append=TINY_FLUX),
    Plan(r"bash scripts/sample_flux.sh.*", append=TINY_FLUX),
    Plan(r"bash scripts/sample_hunyuan_video.sh .*cpu_offload=true.*", append=TINY_HV,
         error="cpu_offload=true needs a CUDA device"),
    Plan(r"NPROC=8 bash scripts/sample_hunyuan_video.sh.*", replace=(("NPROC=8", "NPROC=2"),), append=TINY_HV),
    Plan(r"bash scripts/sample_hunyuan_video.sh.*", append=TINY_HV),
    Plan(r"python -m taylorseer_hunyuan_video\.flops .*"),
    # schedule policies and the 8-bit store (the calibration is written into the working folder, then read)
    Plan(r"bash scripts/calibrate.sh dit .*", append="samples=50 batch_size=50 progress=false"),
    Plan(r"python -m taylorseer_eval.store_fidelity --full-size"),
    Plan(r"python -m taylorseer_eval.store_fidelity", append="--models flux-pipeline --no-progress"),
    Plan(r"python -m taylorseer_eval.stream_fidelity --full-size"),
    Plan(r"python -m taylorseer_eval.stream_fidelity", append="--samples 10 --schedules paper-O1 --no-progress"),
    Plan(r"bash scripts/count_flops.sh.*"),
    # tables: the digits sweep for real (smaller); the GPU tables up to what needs a GPU cluster: every point
    # composed through the app's config and a table of not-yet-run points, and the sweep says they did not finish
    # (exit status 1: a batch user's script must not take an unfinished table for a finished one)
    Plan(r"bash scripts/sweep.sh digits --stage table"),
    Plan(r"bash scripts/sweep.sh (digits_schedules|digits_flux_schedules)", append="--stage table",
         error="did not finish ok"),
    Plan(r"bash scripts/sweep.sh digits", append="num_samples=30 batch_size=30"),
    Plan(r"(\w+=\S+ )?bash scripts/sweep.sh (dit_fid50k|flux_drawbench|hunyuan_vbench) .*", append="--stage table",
         error="did not finish ok"),
    # metrics: every one on a run folder the commands above made, up to the weights this machine cannot fetch
    Plan(r"bash scripts/eval.sh fid .*", error="VIRTUAL_imagenet256_labeled.npz"),
    Plan(r"bash scripts/eval.sh inception .*", error="VIRTUAL_imagenet256_labeled.npz"),
    Plan(r"bash scripts/eval.sh clip .*", error="CLIP"),
    Plan(r"bash scripts/eval.sh imagereward .*", error="setup_eval_envs.sh imagereward"),
    Plan(r"bash scripts/eval.sh fidelity .*", append="--lpips none"),
    Plan(r"bash scripts/eval.sh vbench .*", error="setup_eval_envs.sh vbench"),
    Plan(r"bash scripts/eval.sh <metric> --help", replace=(("<metric>", "fid"),)),
    Plan(r"bash scripts/eval.sh prompts vbench .*", error="setup_eval_envs.sh vbench"),
    Plan(r"bash scripts/eval.sh prompts drawbench .*", error="does not exist (download DrawBench first"),
    # multi-GPU and Slurm: two gloo ranks; a Slurm sweep composed (--cfg hydra) where no cluster is given
    Plan(r"python -m taylorseer.harness.launch --nproc_per_node 8 .*",
         replace=(("--nproc_per_node 8", "--nproc_per_node 2"),),
         append=TINY_DIT + " num_samples=4 batch_size=2 num_steps=6 progress=false"),
    Plan(r"python -m taylorseer_dit.sample_ddp --multirun hydra/launcher=slurm .*",
         replace=(("--multirun", "--cfg hydra"), ("cache.interval=3,4,5", "cache.interval=3"),
                  ("cache.max_order=1,2,3,4", "cache.max_order=1"))),
    # a job's resources from its run (docs/distributed.md, docs/context_parallel.md): refused before submission, or
    # composed and resolved (each job's tasks/GPUs from its parallel.*; one value of a swept degree)
    Plan(r"python -m taylorseer_flux.sample --multirun hydra/launcher=slurm .*tasks_per_node=2$",
         error="cannot run on the resources they would request (nothing was submitted)"),
    Plan(r"python -m taylorseer_(flux|hunyuan_video).sample --multirun hydra/launcher=slurm .*",
         replace=(("--multirun", "--cfg all --resolve"), ("parallel.ulysses=1,2,4", "parallel.ulysses=4"))),
    # presets, performance
    Plan(r"bash scripts/discover.sh /data/.*", error="is neither a folder nor a diffusers class"),
    Plan(r"bash scripts/discover.sh .*"),
    Plan(r"python -m taylorseer.attach.discover my_package.*", error="No module named 'my_package'"),
    Plan(r"bash scripts/benchmark.sh.*", append="--smoke"),
    Plan(r"bash scripts/bench_gpu.sh --dry-run .*"),
    Plan(r"bash scripts/bench_gpu.sh .*", append="--dry-run"),
]


def plan_of(command: str) -> Plan:
    return next(plan for plan in PLANS if plan.matches(command))


def test_every_readme_command_has_a_plan_and_no_figure_is_missing():
    commands = readme_commands()
    assert len(commands) > 40
    unplanned = [c for c in commands if not any(p.matches(c) for p in PLANS)]
    assert not unplanned, f"README/docs commands this test does not know how to run: {unplanned}"
    for page in doc_pages():
        assert "FILL:" not in page.read_text(), f"{page.relative_to(ROOT)}: a figure is still to be filled in"
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme  # the two quick-start commands


def test_readme_is_short_and_its_jobs_table_runs():
    readme = (ROOT / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move a topic to docs/"
    commands = set(readme_commands())
    table = [span for line in readme.splitlines() if line.startswith("|")
             for span in re.findall(r"`([^`]+)`", line) if re.match(r"(\w+=\S+ )?bash scripts/", span)]
    assert len(table) >= 10
    missing = [span for span in table if " ".join(span.split()) not in commands]
    assert not missing, f"README table commands that no ```bash block of README.md or docs/ shows: {missing}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_resolves():
    problems = []
    for page in doc_pages():
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
                problems.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not problems, "\n".join(problems)


def test_no_reference_to_a_page_that_does_not_exist():
    """Comments, docstrings and configs point at docs/ pages, not at the README files that were merged into them."""
    dead = [name + ".md" for name in ("README.presets", "README.perf", "README.store", "README.schedules",
                                      "REFERENCE")]
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"runs", "__pycache__", "node_modules"}]
        for name in files:
            path = Path(folder) / name
            if path.suffix in {".py", ".md", ".yaml", ".sh", ".toml", ".txt"}:
                text = path.read_text(errors="replace")
                found += [f"{path.relative_to(ROOT)}: {page}" for page in dead if page in text]
    assert not found, found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Tiny stand-ins for the real weights, saved by the same code: a DiT-Tiny/2 with ImageNet's 1000 classes
    (official file name) and an SD-style VAE, a FluxPipeline, a HunyuanVideoPipeline."""
    from diffusers.models import AutoencoderKL

    from taylorseer_dit import pipeline
    from taylorseer_dit.models import DiT_models

    root = tmp_path_factory.mktemp("readme")
    dit = root / "dit"
    dit.mkdir()
    torch.manual_seed(0)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=1000)
    model.initialize_weights(zero_init=False)
    torch.save(model.state_dict(), dit / pipeline.official_name("DiT-Tiny/2", 64))
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8
                  ).save_pretrained(dit / "vae")
    work = root / "work"  # the user's working folder: prompt files, runs/
    work.mkdir()
    (work / "prompts.txt").write_text("a photo of the cat\na dog on a skateboard\n")
    (work / "drawbench.txt").write_text("a red cat\nthe cat sleeps\n")
    (work / "vbench_prompts.txt").write_text("a cat walks\na dog runs\n")  # VBench's list needs the vbench env
    return {"dit": dit, "flux": save_tiny_flux(root / "flux"), "hv": save_tiny_pipeline(root / "hv"), "work": work}


def _runs(work: Path, kind: str, pick) -> str:
    """A run folder the earlier commands made (for the README's <run> placeholders)."""
    found = sorted(p for p in (work / "runs" / kind).glob("*") if (p / "metrics.json").is_file() and pick(p))
    assert found, f"no {kind} run folder to fill the README's placeholder"
    return str(found[0])


PLACEHOLDERS = [  # README placeholder -> (kind of run folder, which one)
    ("runs/dit_fid/<run>", "dit_fid", lambda p: True),
    ("runs/flux/<cached run>", "flux", lambda p: p.name.startswith("flux-dev-N6") and not (p / "uncached").is_dir()),
    ("runs/flux/<uncached run>", "flux", lambda p: "nocache" in p.name),
    ("runs/flux/<run made with compare_uncached=true>", "flux", lambda p: (p / "uncached").is_dir()),
    ("runs/flux/<run>", "flux", lambda p: True),
    ("runs/hunyuan_video/<run>", "hunyuan_video", lambda p: True),
]


def _fill(command: str, work: Path) -> str:
    """The README's <...> placeholders: run folders the commands before made."""
    for placeholder, kind, pick in PLACEHOLDERS:
        if placeholder in command:
            command = command.replace(placeholder, _runs(work, kind, pick))
    return command


def _shell(command: str, plan: Plan, tiny: dict) -> str:
    for old, new in plan.replace:
        command = command.replace(old, new.format(**{k: str(v) for k, v in tiny.items()}) if "{" in new else new)
    command = _fill(command, tiny["work"])
    extra = plan.append.format(**{k: shlex.quote(str(v)) for k, v in tiny.items()})
    # The project's scripts live in the repository, the user's files in the working folder.
    command = re.sub(r"(^|\s)bash scripts/", rf"\1bash {ROOT}/scripts/", command)
    command = re.sub(r"(^|\s)tests/", rf"\1{ROOT}/tests/", command)
    return f"{command} {extra}".strip()


def test_every_readme_command_runs_on_the_tiny_models(tiny):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    problems = []
    for command in readme_commands():
        plan = plan_of(command)
        if plan.external:
            continue
        try:
            shell = _shell(command, plan, tiny)
        except AssertionError as err:
            problems.append(f"{command}\n  {err}")
            continue
        result = subprocess.run(["bash", "-c", shell], cwd=tiny["work"], env=env, capture_output=True, text=True,
                                timeout=900)
        if plan.error is None and result.returncode != 0:
            problems.append(f"{command}\n  ran: {shell}\n  exit {result.returncode}: {result.stderr[-1500:]}")
        elif plan.error is not None:
            errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
            if result.returncode == 0 or plan.error not in result.stderr or "Traceback" in result.stderr:
                problems.append(f"{command}\n  ran: {shell}\n  expected a one-line error with {plan.error!r}, got "
                                f"exit {result.returncode}: {result.stderr[-1500:]}")
            elif not errors:
                problems.append(f"{command}\n  no error line: {result.stderr[-500:]}")
    assert not problems, "\n\n".join(problems)
