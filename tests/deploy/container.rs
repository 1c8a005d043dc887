//! The Containerfile (nothing can be pulled here, so it is not built: its structure is checked,
//! and the build context it copies is shown to be a loadable, locked Cargo package) and the
//! image's default config.

use std::process::Command;

use crate::{pullgate_check, read, repo, show, warnings, IMAGE_UID};

/// One instruction: keyword and arguments, continuation lines joined.
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                let (keyword, args) = pending.split_once(' ').unwrap_or((&pending, ""));
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.split_whitespace().collect::<Vec<_>>().join(" "),
                });
                pending.clear();
            }
        }
    }
    out
}

/// The instructions of each stage, by stage.
fn stages(all: &[Instruction]) -> Vec<&[Instruction]> {
    let starts: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        starts.first(),
        Some(&0),
        "the Containerfile starts with FROM"
    );
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| &all[start..starts.get(n + 1).copied().unwrap_or(all.len())])
        .collect()
}

fn json_array(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("exec form (JSON array): {args}: {e}"))
}

#[test]
fn the_containerfile_builds_in_one_stage_and_runs_non_root_in_a_slim_one() {
    let text = read(&repo("Containerfile"));
    let all = instructions(&text);
    let stages = stages(&all);
    assert_eq!(stages.len(), 2, "a builder stage and a runtime stage");
    let (build, runtime) = (stages[0], stages[1]);

    let from = &build[0].args;
    assert!(
        from.contains("rust:") && from.contains("bookworm") && from.ends_with(" AS build"),
        "builder: FROM rust:*bookworm AS build, got {from}"
    );
    let runs = |stage: &[Instruction]| -> String {
        stage
            .iter()
            .filter(|i| i.keyword == "RUN")
            .map(|i| i.args.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let build_runs = runs(build);
    assert!(build_runs.contains("install") && build_runs.contains("cmake"));
    assert!(build_runs.contains("cargo build --release --locked"));

    let from = &runtime[0].args;
    assert!(
        from.contains("debian:bookworm-slim") || from.contains("distroless"),
        "runtime: bookworm-slim or distroless, got {from}"
    );
    assert!(
        runs(runtime).contains("ca-certificates"),
        "upstream TLS uses the system roots"
    );
    let copies: Vec<&str> = runtime
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| i.args.as_str())
        .collect();
    assert!(
        copies.contains(&"--from=build /out/pullgate /usr/local/bin/pullgate"),
        "{copies:?}"
    );
    assert!(
        copies.contains(&"deploy/container/config.toml /etc/pullgate/config.toml"),
        "{copies:?}"
    );
    let last = |keyword: &str| -> &str {
        &runtime
            .iter()
            .rfind(|i| i.keyword == keyword)
            .unwrap_or_else(|| panic!("runtime stage has no {keyword}"))
            .args
    };
    assert_eq!(
        last("USER"),
        format!("{IMAGE_UID}:{IMAGE_UID}"),
        "numeric non-root user, the manifests' runAsUser"
    );
    assert_eq!(json_array(last("ENTRYPOINT")), ["pullgate"]);
    assert_eq!(
        json_array(last("CMD")),
        ["serve", "-c", "/etc/pullgate/config.toml"]
    );
    // The cache directory the default config names belongs to that user.
    assert!(runs(runtime).contains(&format!(
        "install -d -m 0750 -o {IMAGE_UID} -g {IMAGE_UID} /var/cache/pullgate"
    )));
}

/// What the builder stage copies exists, is not excluded by .dockerignore, and is enough for
/// Cargo to load the package with the lock file as it is (`--locked`).
#[test]
fn the_build_context_is_a_locked_cargo_package() {
    let all = instructions(&read(&repo("Containerfile")));
    let ignored: Vec<String> = read(&repo(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    assert!(
        ignored.contains(&"target".to_owned()),
        ".dockerignore keeps target/ out"
    );
    let context = tempfile::tempdir().expect("tempdir");
    for copy in all.iter().filter(|i| i.keyword == "COPY") {
        if copy.args.starts_with("--from=") {
            continue;
        }
        let parts: Vec<&str> = copy.args.split(' ').collect();
        let (sources, _dest) = parts.split_at(parts.len() - 1);
        for source in sources {
            let path = repo(source);
            assert!(path.exists(), "COPY {source}: not in the repository");
            assert!(
                !ignored
                    .iter()
                    .any(|i| source == i || source.starts_with(&format!("{i}/"))),
                "COPY {source}: excluded by .dockerignore"
            );
            let status = Command::new("cp")
                .args(["-r", "--parents", source])
                .arg(context.path())
                .current_dir(crate::ROOT)
                .status()
                .expect("cp");
            assert!(status.success(), "cp {source}");
        }
    }
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .current_dir(context.path())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", show(&out));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let targets = meta["packages"][0]["targets"].as_array().expect("targets");
    assert!(
        targets
            .iter()
            .any(|t| t["name"] == "pullgate" && t["kind"][0] == "bin"),
        "the pullgate binary target is in the context"
    );
}

#[test]
fn pullgate_check_accepts_the_image_default_config_strictly() {
    let out = pullgate_check(&repo("deploy/container/config.toml"), true, &[]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(warnings(&out).is_empty(), "{}", show(&out));
}
