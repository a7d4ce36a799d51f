"""Contract toolchain: generate `gen/`, build buf images, lint, format and breaking checks.

There is no schema registry on our machines, so `buf` never resolves `deps:` itself. Instead the
sources are compiled with `grpc_tools.protoc`: `google/api/*.proto` comes from the
googleapis-common-protos wheel, `google/protobuf/*.proto` from grpcio-tools, and
`buf/validate/validate.proto` from the descriptor that the protovalidate wheel embeds. `buf` then
lints and compares the resulting image (see shared/notes/proto-toolchain.md).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
GEN_DIR = REPO_ROOT / "gen"
BASELINE_IMAGE = REPO_ROOT / "contracts" / "released.binpb"
VALIDATE_PROTO = "buf/validate/validate.proto"
# FileDescriptorSet of our contracts with imports and source info (comments), relative to `gen/`.
DESCRIPTOR_SET = "tessera/descriptor_set.binpb"


class ProtoToolError(RuntimeError):
    """A contract tool failed; the message says which and why."""


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one buf check."""

    name: str
    ok: bool
    output: str


def proto_files(root: Path = PROTO_DIR) -> list[str]:
    """Our contract files, relative to the proto root, in a stable order."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.proto"))


def buf_binary() -> str:
    """The buf executable installed by the buf-bin wheel (next to this interpreter)."""
    candidate = Path(sys.executable).parent / "buf"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("buf")
    if not found:
        raise ProtoToolError("buf not found: install the project ('pip install -e .[dev]') for buf-bin")
    return found


def _googleapis_include() -> Path:
    import google.api.annotations_pb2 as annotations

    root = Path(annotations.__file__).resolve().parent.parent.parent
    if not (root / "google" / "api" / "annotations.proto").exists():
        raise ProtoToolError(f"googleapis-common-protos sources missing under {root}")
    return root


def _validate_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """Extract `buf/validate/validate.proto` from the descriptor bytes the protovalidate wheel embeds."""
    import protovalidate

    source = Path(protovalidate.__file__).parent / "_gen" / "buf" / "validate" / "validate_pb.py"
    if not source.exists():
        raise ProtoToolError(f"protovalidate no longer ships {source}; pin the version in pyproject.toml")
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "file_desc"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            fd = descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value)
            if fd.name == VALIDATE_PROTO:
                return fd
    raise ProtoToolError(f"no descriptor for {VALIDATE_PROTO} found in {source}")


def _write_validate_set(path: Path) -> None:
    from google.protobuf import descriptor_pb2 as d
    from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    for module in (d, duration_pb2, field_mask_pb2, timestamp_pb2):
        module.DESCRIPTOR.CopyToProto(fds.file.add())
    fds.file.append(_validate_descriptor())
    path.write_bytes(fds.SerializeToString())


@contextmanager
def _protoc_inputs(proto_root: Path) -> Iterator[list[str]]:
    with tempfile.TemporaryDirectory(prefix="tessera-protoc-") as tmp:
        validate_set = Path(tmp) / "validate.binpb"
        _write_validate_set(validate_set)
        yield [
            f"-I{proto_root}",
            f"-I{_googleapis_include()}",
            f"--descriptor_set_in={validate_set}",
        ]


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    argv = ["grpc_tools.protoc", *args, f"-I{well_known}"]
    # protoc prints its diagnostics itself; a non-zero code is all we need to report.
    code = protoc.main(argv)
    if code != 0:
        raise ProtoToolError(f"protoc failed (exit {code})")


def build_image(out: Path, proto_root: Path = PROTO_DIR) -> Path:
    """Build a buf image (FileDescriptorSet with imports and source info) of our contracts."""
    files = proto_files(proto_root)
    if not files:
        raise ProtoToolError(f"no .proto files under {proto_root}")
    with _protoc_inputs(proto_root) as includes:
        _protoc([*includes, "--include_imports", "--include_source_info", f"--descriptor_set_out={out}", *files])
    return out


def generate(out_dir: Path = GEN_DIR, proto_root: Path = PROTO_DIR) -> list[Path]:
    """Regenerate `gen/` from scratch: pb2 modules, .pyi stubs, grpc stubs and the descriptor set.

    Generation goes to a temporary directory first so a protoc failure leaves `gen/` untouched
    and files of deleted contracts disappear.
    """
    files = proto_files(proto_root)
    with tempfile.TemporaryDirectory(prefix="tessera-gen-") as tmp:
        staging = Path(tmp) / "gen"
        staging.mkdir()
        with _protoc_inputs(proto_root) as includes:
            _protoc(
                [
                    *includes,
                    f"--python_out={staging}",
                    f"--pyi_out={staging}",
                    f"--grpc_python_out={staging}",
                    *files,
                    VALIDATE_PROTO,
                ]
            )
            # The gateway reads proto comments (OpenAPI descriptions) from this set at run time.
            descriptor_set = staging / DESCRIPTOR_SET
            descriptor_set.parent.mkdir(parents=True, exist_ok=True)
            _protoc(
                [
                    *includes,
                    "--include_imports",
                    "--include_source_info",
                    f"--descriptor_set_out={descriptor_set}",
                    *files,
                ]
            )
        for directory in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            init = directory / "__init__.py"
            if directory != staging and not init.exists():
                init.write_text("")
        (staging / "README.md").write_text(
            "Generated by `tessera proto gen` from `proto/`. Do not edit: CI regenerates and fails on any diff.\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staging, out_dir)
    return sorted(out_dir.rglob("*.py"))


def _tree_files(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def generated_diff(out_dir: Path = GEN_DIR, proto_root: Path = PROTO_DIR) -> list[str]:
    """Regenerate into a scratch directory; list the files of `out_dir` that differ from the result.

    Each entry is `changed: <path>`, `missing: <path>` (generation would add it) or
    `extra: <path>` (generation would delete it), with paths relative to `out_dir`.
    """
    with tempfile.TemporaryDirectory(prefix="tessera-genchk-") as tmp:
        fresh_dir = Path(tmp) / "gen"
        generate(fresh_dir, proto_root)
        fresh = _tree_files(fresh_dir)
    current = _tree_files(out_dir)
    differences = [f"changed: {name}" for name in sorted(fresh.keys() & current.keys()) if fresh[name] != current[name]]
    differences += [f"missing: {name}" for name in sorted(fresh.keys() - current.keys())]
    differences += [f"extra: {name}" for name in sorted(current.keys() - fresh.keys())]
    return differences


def check_generated(out_dir: Path = GEN_DIR, proto_root: Path = PROTO_DIR) -> CheckResult:
    """Regenerate into a scratch copy and compare with the committed `gen/`."""
    differences = generated_diff(out_dir, proto_root)
    if not differences:
        return CheckResult("gen freshness", True, "gen/ matches proto/")
    return CheckResult(
        "gen freshness",
        False,
        "gen/ is stale; run `tessera proto gen` and commit the result:\n" + "\n".join(differences),
    )


def _run_buf(args: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([buf_binary(), *args], cwd=cwd, capture_output=True, text=True)


def _path_args(proto_root: Path) -> list[str]:
    args: list[str] = []
    for f in proto_files(proto_root):
        args += ["--path", f]
    return args


def lint(proto_root: Path = PROTO_DIR) -> CheckResult:
    """`buf lint` (STANDARD, from buf.yaml) on an image of our contracts."""
    with tempfile.TemporaryDirectory() as tmp:
        image = build_image(Path(tmp) / "image.binpb", proto_root)
        proc = _run_buf(["lint", str(image), "--config", str(REPO_ROOT / "buf.yaml"), *_path_args(proto_root)])
    return CheckResult("buf lint", proc.returncode == 0, (proc.stdout + proc.stderr).strip() or "clean")


def format_check(proto_root: Path = PROTO_DIR) -> CheckResult:
    """`buf format --diff --exit-code` on the sources."""
    proc = _run_buf(["format", str(proto_root), "--diff", "--exit-code"])
    return CheckResult("buf format", proc.returncode == 0, (proc.stdout + proc.stderr).strip() or "clean")


def format_write(proto_root: Path = PROTO_DIR) -> CheckResult:
    """`buf format --write`: rewrite the sources in place in buf's canonical format."""
    proc = _run_buf(["format", str(proto_root), "--write"])
    return CheckResult("buf format --write", proc.returncode == 0, (proc.stdout + proc.stderr).strip() or "formatted")


def breaking_against_image(against: Path, proto_root: Path = PROTO_DIR, label: str = "") -> CheckResult:
    """`buf breaking` (FILE rules) of the current contracts against a previously built image."""
    with tempfile.TemporaryDirectory() as tmp:
        image = build_image(Path(tmp) / "image.binpb", proto_root)
        proc = _run_buf(
            [
                "breaking",
                str(image),
                "--against",
                str(against),
                "--config",
                str(REPO_ROOT / "buf.yaml"),
                "--against-config",
                str(REPO_ROOT / "buf.yaml"),
                *_path_args(proto_root),
            ]
        )
    name = f"buf breaking vs {label or against.name}"
    return CheckResult(name, proc.returncode == 0, (proc.stdout + proc.stderr).strip() or "compatible")


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def default_against_ref(repo: Path = REPO_ROOT) -> str:
    """HEAD when proto/ has uncommitted changes, else the previous commit."""
    dirty = _git(repo, "status", "--porcelain", "--", "proto").stdout.strip()
    return "HEAD" if dirty else "HEAD~1"


def breaking_against_ref(ref: str, repo: Path = REPO_ROOT) -> CheckResult:
    """`buf breaking` of `repo/proto` (working tree) against its contracts at a git revision.

    A revision that does not exist (the first commit, a shallow clone) or has no contracts yet
    passes with a message saying there was nothing to compare.
    """
    name = f"buf breaking vs {ref}"
    if _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        return CheckResult(name, True, f"{ref} not found (first commit, shallow clone or no git): nothing to compare")
    listing = _git(repo, "ls-tree", "-r", "--name-only", ref, "--", "proto").stdout.split()
    if not any(path.endswith(".proto") for path in listing):
        return CheckResult(name, True, f"{ref} has no contracts: nothing to compare")
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", ref, "proto"], cwd=repo, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        old_image = build_image(Path(tmp) / "old.binpb", Path(tmp) / "proto")
        return breaking_against_image(old_image, repo / "proto", label=ref)


def release_baseline(out: Path = BASELINE_IMAGE, proto_root: Path = PROTO_DIR) -> Path:
    """Deliberate release step: freeze the current contracts as the released baseline image."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        image = build_image(Path(tmp) / "image.binpb", proto_root)
        # `buf build -o` re-encodes the protoc image as a canonical buf image.
        proc = _run_buf(["build", str(image), "-o", str(out)])
        if proc.returncode != 0:
            raise ProtoToolError(f"buf build failed: {proc.stderr.strip()}")
    return out
