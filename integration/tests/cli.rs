//! `switchyard rules check | explain | schema` as an operator runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use integration::bin;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn check_accepts_the_example_and_lists_every_problem_of_a_bad_file() {
    let ok = Command::new(bin("switchyard").unwrap())
        .args(["rules", "check"])
        .arg(repo().join("examples/rules.yaml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok (5 pools, 1 models, 4 rules)"));

    let bad = Command::new(bin("switchyard").unwrap())
        .args(["rules", "check"])
        .arg(repo().join("routing-rules/tests/fixtures/invalid/impossible-range.yaml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("rules[0].when.context_tokens (line 7"),
        "{err}"
    );
    assert!(err.contains("rules[0].when.prompt_tokens (line 8"), "{err}");
}

#[test]
fn explain_prints_the_features_and_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    std::fs::write(&req, r#"{"model":"smollm2","max_tokens":100,"messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:,"}}]}]}"#).unwrap();
    let out = Command::new(bin("switchyard").unwrap())
        .args(["rules", "explain"])
        .arg(repo().join("examples/rules.yaml"))
        .arg(&req)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["rule"], "multimodal");
    assert_eq!(
        v["decision"]["targets"],
        serde_json::json!(["h100-spot", "h100-ondemand"])
    );
    assert_eq!(
        v["features"]["modalities"],
        serde_json::json!(["text", "image"])
    );
    assert!(
        v["features"]["prompt_tokens"].as_u64().unwrap() >= 765,
        "the image's token cost counts"
    );
}

#[test]
fn schema_is_json() {
    let out = Command::new(bin("switchyard").unwrap())
        .args(["rules", "schema"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["properties"]["version"]["const"], 1);
}
