//! The `flamingo generate` and `flamingo eval` contracts, run as a user runs them, on the tiny
//! reference fixtures.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn flamingo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flamingo")).args(args).current_dir(root()).output().expect("run flamingo")
}

fn expected(case: &str) -> serde_json::Value {
    let p = root().join(format!("tests/fixtures/models/{case}/expected.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// The reference stops only at <|endofchunk|>; the CLI also stops at eos. Cut the reference ids
/// after the first eos, if any.
fn cut_at(mut v: Vec<u64>, eos: u64) -> Vec<u64> {
    if let Some(i) = v.iter().position(|&t| t == eos) {
        v.truncate(i + 1);
    }
    v
}

#[test]
fn generate_json_greedy_and_beam_match_the_reference() {
    for case in ["mpt_x1", "llama_x2"] {
        let exp = expected(case);
        let eos = exp["eos_token_id"].as_u64().unwrap();
        let model = format!("tests/fixtures/models/{case}");
        for p in exp["prompts"].as_array().unwrap() {
            let mut args = vec!["generate", "--model", &model, "--prompt", p["text"].as_str().unwrap(), "--json"];
            let images: Vec<String> =
                p["images"].as_array().unwrap().iter().map(|i| format!("tests/fixtures/images/{}", i.as_str().unwrap())).collect();
            for i in &images {
                args.extend(["--image", i.as_str()]);
            }
            let greedy_n = p["greedy"]["max_new_tokens"].to_string();
            let mut g = args.clone();
            g.extend(["--max-new-tokens", &greedy_n]);
            let out = flamingo(&g);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
            assert!(v["text"].is_string());
            assert_eq!(ids(&v["token_ids"]), cut_at(ids(&p["greedy"]["ids"]), eos), "{case} {}", p["name"]);

            let beam_n = p["beam3"]["max_new_tokens"].to_string();
            let mut b = args.clone();
            b.extend(["--max-new-tokens", &beam_n, "--num-beams", "3"]);
            let out = flamingo(&b);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let want = ids(&p["beam3"]["ids"]);
            if !want.contains(&eos) {
                assert_eq!(ids(&v["token_ids"]), want, "{case} {} beam 3", p["name"]);
            }
        }
    }
}

/// An IDEFICS directory through the same `--model` path: the raw prompt in the model's own
/// form (`<fake_token_around_image><image><fake_token_around_image>` per image), BOS added, the
/// images preprocessed as IDEFICS' processor does; greedy and beam ids are transformers'.
#[test]
fn generate_json_on_idefics_matches_the_reference() {
    let case = "idefics_x2";
    let p = root().join(format!("tests/fixtures/idefics/{case}/expected.json"));
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let model = format!("tests/fixtures/idefics/{case}");
    let stops = [2u64, exp["end_of_utterance_id"].as_u64().unwrap()];
    let cut = |v: Vec<u64>| -> Vec<u64> {
        match v.iter().position(|t| stops.contains(t)) {
            Some(i) => v[..i].to_vec(),
            None => v,
        }
    };
    for (name, p) in exp["prompts"].as_object().unwrap() {
        let text = p["text"].as_str().unwrap().strip_prefix("<s>").unwrap();
        let mut args = vec!["generate", "--model", &model, "--prompt", text, "--json"];
        let images: Vec<String> = p["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.as_str())
            .filter(|i| i.ends_with(".png"))
            .map(|i| format!("tests/fixtures/images/{i}"))
            .collect();
        for i in &images {
            args.extend(["--image", i.as_str()]);
        }
        let greedy_n = exp["greedy_max_new_tokens"].to_string();
        let mut g = args.clone();
        g.extend(["--max-new-tokens", &greedy_n]);
        let out = flamingo(&g);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        assert_eq!(ids(&v["token_ids"]), cut(ids(&p["greedy"])), "{case} {name} greedy");

        let beam_n = exp["beam"]["max_new_tokens"].to_string();
        let mut b = args.clone();
        b.extend(["--max-new-tokens", &beam_n, "--num-beams", "3"]);
        let out = flamingo(&b);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = ids(&p["beam3"]);
        if !want.iter().any(|t| stops.contains(t)) {
            assert_eq!(ids(&v["token_ids"]), want, "{case} {name} beam 3");
        }
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let args = [
        "generate",
        "--model",
        "tests/fixtures/models/gptneox_x1",
        "--image",
        "tests/fixtures/images/chelsea.png",
        "--prompt",
        "<image>Output:",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "7",
        "--json",
    ];
    let a = flamingo(&args);
    let b = flamingo(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn user_errors_are_clear_and_not_panics() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "generate",
                "--model",
                "tests/fixtures/models/mpt_x1",
                "--prompt",
                "<image>a<image>b",
                "--image",
                "tests/fixtures/images/chelsea.png",
            ],
            "2 <image> markers but 1 --image",
        ),
        (&["generate", "--model", "/nonexistent", "--prompt", "x"], "model directory not found"),
        (&["generate", "--model", "tests/fixtures/models/mpt_x1", "--prompt", "<image>", "--image", "Cargo.toml"], "image"),
        (&["generate", "--model", "tests/fixtures/models/mpt_x1", "--prompt", "x", "--dtype", "f8"], "unknown dtype"),
        (&["generate", "--model", "tests/fixtures/models/mpt_x1", "--prompt", "x", "--dtype", "bf16"], "bf16 is not supported on the CPU"),
        (&["generate", "--model", "tests/fixtures/models/mpt_x1", "--prompt", "x", "--device", "cuda"], "CUDA"),
    ];
    for (args, want) in cases {
        let out = flamingo(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn half_precision_runs() {
    let out = flamingo(&[
        "generate",
        "--model",
        "tests/fixtures/models/llama_x1",
        "--image",
        "tests/fixtures/images/chelsea.png",
        "--prompt",
        "<image>Output:",
        "--dtype",
        "f16",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
}

#[test]
fn bench_runs_on_a_tiny_random_model() {
    // Not a timing test: the benchmark must keep working; its figures live in BENCHMARKS.md.
    let out = flamingo(&["bench", "--size", "tiny", "--repeats", "1", "--decode-steps", "2", "--concurrency", "1,4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for section in ["Aggregate decode throughput", "4-shot prompt", "vision cache"] {
        assert!(text.contains(section), "{text}");
    }
    assert!(text.contains("| 4 |"), "{text}");
    // The GPU check's form: paged K/V, figures as JSON.
    let json = std::env::temp_dir().join(format!("flamingo-bench-{}.json", std::process::id()));
    let out = flamingo(&[
        "bench",
        "--size",
        "tiny",
        "--repeats",
        "1",
        "--decode-steps",
        "2",
        "--concurrency",
        "1,4",
        "--kv",
        "paged",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["kv"], "paged");
    assert_eq!(r["decode"].as_array().unwrap().len(), 2);
    assert!(r["decode"][1]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["prefix"]["hit_ms"].as_f64().unwrap() > 0.0 && r["decode_weight_bytes"].as_u64().unwrap() > 0);
    std::fs::remove_file(&json).ok();

    // Several precisions: one report each, fewer bytes per step in fewer bits, and the
    // comparison table; an unknown one is refused.
    let out = flamingo(&[
        "bench",
        "--size",
        "tiny",
        "--sections",
        "decode",
        "--repeats",
        "1",
        "--decode-steps",
        "2",
        "--concurrency",
        "1",
        "--quantize",
        "none,f16,q8_0,q8_0_head",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Precisions compared"));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let p = r["precisions"].as_array().expect("one report per precision");
    let names: Vec<&str> = p.iter().filter_map(|x| x["quantize"].as_str()).collect();
    assert_eq!(names, ["none", "f16", "q8_0", "q8_0_head"]);
    let bytes: Vec<u64> = p.iter().filter_map(|x| x["decode_weight_bytes"].as_u64()).collect();
    assert!(bytes.windows(2).all(|w| w[0] > w[1]), "{bytes:?}");
    assert!(p.iter().all(|x| x["decode"][0]["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0)));
    std::fs::remove_file(&json).ok();
    let out = flamingo(&["bench", "--size", "tiny", "--quantize", "q4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown quantization"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn eval_prints_every_row_as_json() {
    // A random model scores about nothing; the contract is the shape of the report. Its
    // Perceiver has no frame embeddings, so the motion row's videos are refused (and counted
    // as wrong), which must not end the run.
    let out = flamingo(&["eval", "--model", "tests/fixtures/models/mosaicgpt_x1", "--n", "2", "--seed", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["model"].as_str(), Some("tests/fixtures/models/mosaicgpt_x1"));
    assert_eq!((v["seed"].as_u64(), v["n"].as_u64()), (Some(3), Some(2)));
    let rows = v["rows"].as_object().expect("rows");
    let want = flamingo_server::world::EVAL_ROWS;
    let mut names: Vec<&str> = rows.keys().map(String::as_str).collect();
    let mut sorted = want.to_vec();
    names.sort_unstable();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "every row");
    // In the table's order in the text (serde_json's map above sorts its keys).
    let raw = String::from_utf8_lossy(&out.stdout);
    let at: Vec<usize> = want.iter().map(|r| raw.find(&format!("\"{r}\":{{")).expect("row key")).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{raw}");
    for (row, r) in rows {
        assert_eq!(r["n"].as_u64(), Some(2), "{row}");
        let (correct, acc) = (r["correct"].as_u64().unwrap(), r["accuracy"].as_f64().unwrap());
        assert!(correct <= 2 && (acc - correct as f64 / 2.0).abs() < 1e-9, "{row}: {r}");
    }
    assert_eq!(rows["motion"]["failed"].as_u64(), Some(2), "{}", v);

    // The table, and wrong replies with --show-errors.
    let out = flamingo(&["eval", "--model", "tests/fixtures/models/mosaicgpt_x1", "--n", "1", "--show-errors", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("row"), "{text}");
    for row in want {
        assert!(text.lines().any(|l| l.starts_with(row) && l.ends_with('%')), "{row}: {text}");
    }
    assert!(text.contains("expected:"), "{text}");
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

#[test]
fn generate_preprocesses_as_the_model_directory_says() {
    // The same model with `[preprocess] resize = "stretch"`: the whole 451x300 image reaches
    // the vision tower instead of its centre, and the random model's greedy ids change.
    let dir = std::env::temp_dir().join(format!("flamingo-cli-stretch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&root().join("tests/fixtures/models/mosaicgpt_x1"), &dir);
    std::fs::write(dir.join("flamingo.toml"), "[preprocess]\nresize = \"stretch\"\n").unwrap();
    let run = |model: &str| {
        let out = flamingo(&[
            "generate",
            "--model",
            model,
            "--image",
            "tests/fixtures/images/chelsea.png",
            "--prompt",
            "<image>Output:",
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids(&v["token_ids"])
    };
    let stretched = run(dir.to_str().unwrap());
    assert_ne!(stretched, run("tests/fixtures/models/mosaicgpt_x1"));
    std::fs::write(dir.join("flamingo.toml"), "[preprocess]\nresize = \"squash\"\n").unwrap();
    let out = flamingo(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("flamingo.toml") && err.contains("[preprocess] resize") && err.contains("\"stretch\""), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `flamingo parity` (what the GPU check runs) on the CPU, with both K/V layouts: every id
/// equals the reference's and the JSON says so; a dtype that drifts is reported, not hidden.
#[test]
fn parity_passes_on_the_cpu_with_both_kv_layouts() {
    let dir = std::env::temp_dir().join(format!("flamingo-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for kv in ["own", "paged"] {
        let json = dir.join(format!("{kv}.json"));
        let out = flamingo(&["parity", "--fixtures", "tests/fixtures/models", "--kv", kv, "--exact", "--json", json.to_str().unwrap()]);
        assert!(out.status.success(), "{kv}: {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(r["all_ids_equal"], true, "{kv}");
        assert_eq!(r["cases"].as_array().unwrap().len(), 8, "{kv}: every fixture case");
        let drift = r["max_logit_drift"].as_f64().unwrap();
        assert!(drift < 1e-4, "{kv}: f32 logit drift {drift}");
    }
    let out =
        flamingo(&["parity", "--fixtures", "tests/fixtures/models", "--dtype", "f16", "--json", dir.join("f16.json").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("f16.json")).unwrap()).unwrap();
    assert!(r["max_logit_drift"].as_f64().unwrap() > 1e-4, "f16 drifts measurably");
    let out = flamingo(&["parity", "--fixtures", "tests/fixtures"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no fixture cases"));
    std::fs::remove_dir_all(&dir).ok();
}
