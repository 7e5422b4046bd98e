//! Runs against the real SmolLM2-135M-Instruct GGUF when it is present
//! (`scripts/fetch-model.sh` puts it in `models/`; `SWITCHYARD_SMOLLM2` overrides the path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use integration::{TestEnv, WorkerSpec};
use serde_json::{Value, json};

fn model_path() -> Option<PathBuf> {
    model_meta::workspace_smollm2()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_answers_through_the_router() {
    let Some(model) = model_path() else {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/fetch-model.sh)");
        return;
    };
    let rules = format!(
        r#"
version: 1
models:
  smollm2: {{ tokenizer: {{ gguf: "{}" }}, context_window: 8192, default_max_tokens: 64 }}
pools:
  cpu: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.2 }}
rules:
  - name: all
    route: [cpu]
"#,
        model.display()
    );
    let env = TestEnv::new()
        .rules(&rules)
        .worker(WorkerSpec::new("cpu").model(model, "smollm2"))
        .start()
        .await
        .unwrap();
    // Three questions at once: they run in one continuous batch. One carries its own
    // system prompt; the others get the model's default one from its chat template.
    let ask = |system: Option<&str>, country: &str| {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(json!({ "role": "system", "content": s }));
        }
        messages.push(
            json!({ "role": "user", "content": format!("What is the capital of {country}?") }),
        );
        let body = json!({
            "model": "smollm2", "messages": messages, "max_tokens": 24, "temperature": 0,
        });
        let env = &env;
        async move { env.chat(&body).await }
    };
    let (france, japan, italy) = tokio::join!(
        ask(Some("You are a helpful assistant."), "France"),
        ask(None, "Japan"),
        ask(None, "Italy"),
    );
    for (r, city) in [(france, "Paris"), (japan, "Tokyo"), (italy, "Rome")] {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-switchyard-pool"], "cpu");
        let v: Value = r.json().await.unwrap();
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.contains(city), "{city}: {text}");
    }
}
