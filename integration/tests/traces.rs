//! OpenTelemetry traces through the real router and workers, received by a small OTLP/HTTP
//! receiver built on the OTLP protobuf definitions (`opentelemetry-proto`): a request that
//! fails over from a preempted spot worker to on-demand must arrive as one trace —
//! classify → route → attempt(spot, failed: preempted) → attempt(on-demand, ok) → relay —
//! under the client's `traceparent`, with each worker's spans under the attempt that
//! reached it, and its trace id in the access line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use integration::{FLEET_RULES, TestEnv, WorkerSpec, chat_body, eventually, header};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

/// A span as received, with the service that sent it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        let v = self
            .span
            .attributes
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .as_ref()?
            .value
            .as_ref()?;
        Some(match v {
            Any::StringValue(s) => s.clone(),
            Any::IntValue(i) => i.to_string(),
            Any::BoolValue(b) => b.to_string(),
            Any::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }
    fn error(&self) -> bool {
        // STATUS_CODE_ERROR
        self.span.status.as_ref().is_some_and(|s| s.code == 2)
    }
}

type Received = Arc<Mutex<Vec<Got>>>;

/// Accepts OTLP/HTTP protobuf exports on `/v1/traces`; returns its base URL.
async fn receiver() -> (String, Received) {
    async fn export(State(got): State<Received>, body: Bytes) -> Vec<u8> {
        let req = ExportTraceServiceRequest::decode(body).expect("an OTLP export");
        let mut got = got.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        ExportTraceServiceResponse::default().encode_to_vec()
    }
    let got = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(Arc::clone(&got));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_over_request_is_one_trace_from_the_client_through_both_workers() {
    let (otlp, got) = receiver().await;
    let traced = |w: WorkerSpec| w.arg("--otlp-endpoint").arg(&otlp);
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .router_arg("--otlp-endpoint")
        .router_arg(&otlp)
        .worker(traced(WorkerSpec::new("l40s-spot").faulty()))
        .worker(traced(WorkerSpec::new("l40s-ondemand")))
        .start()
        .await
        .unwrap();

    // A client whose trace is not sampled: nothing of it is exported, by either process.
    let quiet = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.proxy))
        .header("traceparent", format!("00-{quiet}-00f067aa0ba902b7-00"))
        .json(&chat_body("tiny", 1500, 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The traced request: the spot worker is preempted, on-demand answers.
    env.faults(0, json!({ "fail_next": 1 })).await.unwrap();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let r = env
        .http
        .post(format!("{}/v1/chat/completions", env.proxy))
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .header("x-request-id", "find-me-42")
        .json(&chat_body("tiny", 1500, 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    let _ = r.bytes().await;

    // every span of the trace: the router's 6, and each worker's (spot: 1, on-demand: 5)
    let spans = eventually(Duration::from_secs(20), "the trace's spans", || async {
        let all = got.lock().unwrap().clone();
        let ours: Vec<Got> = all
            .into_iter()
            .filter(|g| hex(&g.span.trace_id) == trace)
            .collect();
        let decode = ours.iter().any(|g| g.span.name == "decode");
        let root = ours
            .iter()
            .any(|g| g.service == "switchyard-router" && g.span.name.starts_with("POST"));
        (decode && root && ours.len() >= 12).then_some(ours)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", got.lock().unwrap()));
    let find = |service: &str, name: &str| -> Got {
        spans
            .iter()
            .find(|g| g.service == service && g.span.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {service} span {name}: {spans:#?}"))
    };

    // the router's span continues the client's trace and tells the request's story
    let root = find("switchyard-router", "POST /v1/chat/completions");
    assert_eq!(hex(&root.span.parent_span_id), client_span);
    assert_eq!(
        root.attr("switchyard.request_id").as_deref(),
        Some("find-me-42")
    );
    assert_eq!(root.attr("switchyard.attempts").as_deref(), Some("2"));
    assert_eq!(
        root.attr("switchyard.pool").as_deref(),
        Some("l40s-ondemand")
    );
    assert_eq!(root.attr("switchyard.rule").as_deref(), Some("chat"));
    assert_eq!(
        root.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(
        root.attr("gen_ai.usage.output_tokens").is_some(),
        "{root:#?}"
    );
    assert!(!root.error());

    // its stages, in order, all children of the request's span
    let stages: Vec<Got> = {
        let mut s: Vec<Got> = spans
            .iter()
            .filter(|g| g.span.parent_span_id == root.span.span_id)
            .cloned()
            .collect();
        s.sort_by_key(|g| g.span.start_time_unix_nano);
        s
    };
    let names: Vec<&str> = stages.iter().map(|g| g.span.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "classify",
            "route",
            "attempt l40s-spot",
            "attempt l40s-ondemand",
            "relay"
        ],
        "{stages:#?}"
    );
    let spot = &stages[2];
    assert_eq!(
        spot.attr("switchyard.outcome").as_deref(),
        Some("preempted")
    );
    assert!(spot.error());
    assert_eq!(
        spot.attr("switchyard.worker").as_deref(),
        Some("l40s-spot-0")
    );
    let on_demand = &stages[3];
    assert_eq!(on_demand.attr("switchyard.outcome").as_deref(), Some("ok"));
    assert!(!on_demand.error());
    assert!(stages[0].attr("gen_ai.usage.input_tokens").is_some());
    assert_eq!(stages[1].attr("switchyard.rule").as_deref(), Some("chat"));
    for g in &stages {
        assert!(g.span.end_time_unix_nano >= g.span.start_time_unix_nano);
        assert!(g.span.start_time_unix_nano >= root.span.start_time_unix_nano);
        assert!(
            g.span.end_time_unix_nano <= root.span.end_time_unix_nano,
            "{g:#?}"
        );
    }

    // each worker's span sits under the attempt that reached it
    let workers: Vec<&Got> = spans
        .iter()
        .filter(|g| g.service == "switchyard-worker" && g.span.name.starts_with("POST"))
        .collect();
    assert_eq!(workers.len(), 2, "{workers:#?}");
    let under = |attempt: &Got| {
        workers
            .iter()
            .find(|w| w.span.parent_span_id == attempt.span.span_id)
            .copied()
            .unwrap_or_else(|| panic!("no worker span under {attempt:#?}"))
    };
    let refused = under(spot);
    assert!(refused.error(), "the preempted worker's span: {refused:#?}");
    let served = under(on_demand);
    assert!(!served.error());
    assert_eq!(
        served.attr("switchyard.request_id").as_deref(),
        Some("find-me-42")
    );
    let phases: Vec<&str> = {
        let mut p: Vec<&Got> = spans
            .iter()
            .filter(|g| g.span.parent_span_id == served.span.span_id)
            .collect();
        p.sort_by_key(|g| g.span.start_time_unix_nano);
        p.iter().map(|g| g.span.name.as_str()).collect()
    };
    assert_eq!(phases, ["tokenize", "queue", "prefill", "decode"]);
    let decode = find("switchyard-worker", "decode");
    assert_eq!(
        decode.attr("gen_ai.usage.output_tokens"),
        root.attr("gen_ai.usage.output_tokens")
    );

    // the unsampled request left nothing
    let quiet_spans = got
        .lock()
        .unwrap()
        .iter()
        .filter(|g| hex(&g.span.trace_id) == quiet)
        .count();
    assert_eq!(quiet_spans, 0);

    // the access line names the trace: log → trace
    let line = eventually(Duration::from_secs(5), "the access line", || async {
        env.log("router.log")
            .lines()
            .find(|l| l.contains("\"request_id\":\"find-me-42\""))
            .map(str::to_string)
    })
    .await
    .unwrap();
    assert!(
        line.contains(&format!("\"trace_id\":\"{trace}\"")),
        "{line}"
    );
}
