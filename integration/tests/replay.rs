//! `switchyard replay` (#21): a synthetic trace replayed through the real router in front of
//! a simulated fleet, once per rules file: the tiered rules cost less per token than all
//! requests on on-demand H100s, and spot preemptions during the replay fail no request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use integration::bin;
use serde_json::Value;

#[test]
fn tiered_rules_cost_less_than_all_h100_and_preemptions_fail_nothing() {
    if model_meta::workspace_smollm2().is_none() {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-model.sh)");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let out = Command::new(bin("switchyard").unwrap())
        .args([
            "replay",
            "--generate",
            "40",
            "--rate",
            "2",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = dir.path().join("replay.json");
    let out = Command::new(bin("switchyard").unwrap())
        .current_dir(&root)
        .args(["replay", "--trace"])
        .arg(&trace)
        .args([
            "--rules",
            "examples/replay/all-h100-ondemand.yaml",
            "--rules",
            "examples/replay/tiered-slo.yaml",
            "--speed",
            "10",
            "--preempt-every",
            "5",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = v["results"].as_array().unwrap();
    let (h100, tiered) = (&results[0], &results[1]);
    for r in results {
        assert_eq!(r["requests"], 40, "{r}");
        assert_eq!(r["failures"], 0, "no request fails: {r}");
    }
    assert!(tiered["preemptions"].as_u64().unwrap() >= 3, "{tiered}");
    let cost = |r: &Value| r["usd_per_million_tokens"].as_f64().unwrap();
    assert!(
        cost(tiered) < cost(h100),
        "tiers cost less per token: {} vs {}",
        cost(tiered),
        cost(h100)
    );
    assert!(
        tiered["by_pool"].as_object().unwrap().len() >= 2,
        "several tiers served: {tiered}"
    );
}
