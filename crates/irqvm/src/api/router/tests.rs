//! The router against a fake VM: every path, the refusals, and a proptest over random
//! methods, paths and bodies (never a panic; always a status in range and a JSON body).

use std::sync::Mutex;

use proptest::prelude::*;

use super::*;
use crate::api::model::{LapicInfo, PendingInfo};

/// A VM of two vCPUs that records what it was asked.
#[derive(Default)]
struct Fake {
    paused: Mutex<bool>,
    calls: Mutex<Vec<String>>,
    tracing: Mutex<Option<String>>,
}

impl Fake {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

impl Control for Fake {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: if *self.paused.lock().unwrap() {
                "paused"
            } else {
                "running"
            }
            .into(),
            irqchip: "user".into(),
            vcpus: 2,
            uptime_ms: 5,
            vcpu_threads: vec!["running".into(); 2],
        }
    }
    fn pause(&self) -> Result<(), ApiError> {
        let mut p = self.paused.lock().unwrap();
        if *p {
            return Err(ApiError::Conflict("already paused".into()));
        }
        *p = true;
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        let mut p = self.paused.lock().unwrap();
        if !*p {
            return Err(ApiError::Conflict("not paused".into()));
        }
        *p = false;
        Ok(())
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.record("shutdown".into());
        Ok(())
    }
    fn vcpu_count(&self) -> usize {
        2
    }
    fn vcpu(&self, index: usize) -> Result<VcpuInfo, ApiError> {
        assert!(index < 2, "the router asked for vCPU {index}");
        Ok(VcpuInfo {
            index,
            thread: "running".into(),
            mp_state: "runnable".into(),
            halted: false,
            rip: 0x1000,
            pending: PendingInfo::default(),
            lapic: LapicInfo::default(),
        })
    }
    fn platform(&self) -> Result<PlatformInfo, ApiError> {
        Ok(PlatformInfo::default())
    }
    fn counters(&self) -> Counters {
        Counters::new()
    }
    fn line(&self, request: &LineRequest) -> Result<(), ApiError> {
        if request.gsi >= 24 {
            return Err(ApiError::BadRequest("no such line".into()));
        }
        self.record(format!("line {} {}", request.gsi, request.action));
        Ok(())
    }
    fn msi(&self, request: &MsiRequest) -> Result<bool, ApiError> {
        if request.address >> 20 != 0xFEE {
            return Err(ApiError::BadRequest("not an interrupt address".into()));
        }
        Ok(true)
    }
    fn event(&self, index: usize, event: HostEvent) -> Result<bool, ApiError> {
        assert!(index < 2, "the router raised an event at vCPU {index}");
        self.record(format!("{event:?} {index}"));
        Ok(true)
    }
    fn trace_start(&self, request: &TraceStartRequest) -> Result<(), ApiError> {
        let mut on = self.tracing.lock().unwrap();
        if on.is_some() {
            return Err(ApiError::Conflict("already recording".into()));
        }
        *on = Some(request.path.clone());
        Ok(())
    }
    fn trace_stop(&self) -> Result<TraceStopped, ApiError> {
        let path = self.tracing.lock().unwrap().take();
        let path = path.ok_or_else(|| ApiError::Conflict("not recording".into()))?;
        Ok(TraceStopped {
            path,
            events: 3,
            dropped_events: 0,
        })
    }
}

fn call(fake: &Fake, method: &str, path: &str, body: &str) -> Reply {
    route(method, path, body.as_bytes(), fake)
}

fn error_of(reply: &Reply) -> String {
    let body: ErrorBody = serde_json::from_str(&reply.body).expect("an error body");
    body.error
}

#[test]
fn cloud_hypervisor_paths_answer() {
    let fake = Fake::default();
    let info = call(&fake, "GET", "/api/v1/vm.info", "");
    assert_eq!(info.status, 200);
    let info: VmInfo = serde_json::from_str(&info.body).unwrap();
    assert_eq!((info.state.as_str(), info.vcpus), ("running", 2));
    assert_eq!(call(&fake, "PUT", "/api/v1/vm.pause", "").status, 204);
    let again = call(&fake, "PUT", "/api/v1/vm.pause", "");
    assert_eq!(again.status, 409);
    assert!(error_of(&again).contains("paused"));
    assert_eq!(call(&fake, "PUT", "/api/v1/vm.resume", "").status, 204);
    assert_eq!(call(&fake, "PUT", "/api/v1/vm.resume", "").status, 409);
    assert_eq!(call(&fake, "GET", "/api/v1/vm.counters", "").status, 200);
    assert_eq!(call(&fake, "GET", "/api/v1/vmm.ping", "").status, 200);
    assert_eq!(call(&fake, "PUT", "/api/v1/vm.shutdown", "").status, 204);
}

#[test]
fn vcpu_paths_answer_and_refuse() {
    let fake = Fake::default();
    let all = call(&fake, "GET", "/api/v1/vcpus", "");
    let all: Vec<VcpuInfo> = serde_json::from_str(&all.body).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(call(&fake, "GET", "/api/v1/vcpus/1", "").status, 200);
    assert_eq!(call(&fake, "GET", "/api/v1/vcpus/2", "").status, 404);
    assert_eq!(
        call(&fake, "GET", "/api/v1/vcpus/99999999999999999999999", "").status,
        404
    );
    assert_eq!(call(&fake, "GET", "/api/v1/vcpus/01", "").status, 404);
    assert_eq!(call(&fake, "PUT", "/api/v1/vcpus/1", "").status, 405);
    assert_eq!(call(&fake, "PUT", "/api/v1/vcpus/1/nmi", "").status, 200);
    assert_eq!(call(&fake, "PUT", "/api/v1/vcpus/0/init", "").status, 200);
    let sipi = call(&fake, "PUT", "/api/v1/vcpus/1/sipi", r#"{"vector": 16}"#);
    assert_eq!(
        (sipi.status, sipi.body.as_str()),
        (200, r#"{"delivered":true}"#)
    );
    assert_eq!(call(&fake, "PUT", "/api/v1/vcpus/1/sipi", "{}").status, 400);
    assert_eq!(
        call(&fake, "PUT", "/api/v1/vcpus/1/sipi", r#"{"vector": 256}"#).status,
        400
    );
    assert_eq!(call(&fake, "GET", "/api/v1/vcpus/1/nmi", "").status, 405);
    assert_eq!(call(&fake, "PUT", "/api/v1/vcpus/1/reset", "").status, 404);
    assert_eq!(
        *fake.calls.lock().unwrap(),
        vec!["Nmi 1", "Init 0", "Sipi(16) 1"]
    );
}

#[test]
fn injection_bodies_are_checked() {
    let fake = Fake::default();
    let line = r#"{"gsi": 10, "action": "pulse"}"#;
    assert_eq!(call(&fake, "PUT", "/api/v1/irq.line", line).status, 204);
    assert_eq!(
        call(
            &fake,
            "PUT",
            "/api/v1/irq.line",
            r#"{"gsi": 99, "action": "pulse"}"#
        )
        .status,
        400
    );
    assert_eq!(
        call(&fake, "PUT", "/api/v1/irq.line", r#"{"gsi": 1}"#).status,
        400
    );
    assert_eq!(
        call(
            &fake,
            "PUT",
            "/api/v1/irq.line",
            r#"{"gsi": 1, "action": "x", "y": 1}"#
        )
        .status,
        400
    );
    assert_eq!(
        call(&fake, "PUT", "/api/v1/irq.line", "{not json").status,
        400
    );
    let msi = call(
        &fake,
        "PUT",
        "/api/v1/irq.msi",
        r#"{"address": 4276092928, "data": 65}"#,
    );
    assert_eq!(
        (msi.status, msi.body.as_str()),
        (200, r#"{"delivered":true}"#)
    );
    assert_eq!(
        call(
            &fake,
            "PUT",
            "/api/v1/irq.msi",
            r#"{"address": 0, "data": 65}"#
        )
        .status,
        400
    );
    assert_eq!(call(&fake, "GET", "/api/v1/irq.msi", "").status, 405);
    assert_eq!(*fake.calls.lock().unwrap(), vec!["line 10 pulse"]);
}

#[test]
fn unknown_paths_and_methods_are_refused() {
    let fake = Fake::default();
    for path in [
        "/",
        "/api/v1",
        "/api/v1/",
        "/api/v2/vm.info",
        "/api/v1/vm.info/x",
        "/api/v1/vcpusx",
    ] {
        let reply = call(&fake, "GET", path, "");
        assert_eq!(reply.status, 404, "{path}");
        assert!(!error_of(&reply).is_empty());
    }
    assert_eq!(call(&fake, "DELETE", "/api/v1/vm.info", "").status, 405);
    assert_eq!(call(&fake, "GET", "/api/v1/vm.pause", "").status, 405);
    // A query string does not change the route.
    assert_eq!(call(&fake, "GET", "/api/v1/vm.info?x=1", "").status, 200);
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_string()),
        Just("PUT".to_string()),
        Just("POST".to_string()),
        Just("DELETE".to_string()),
        "[A-Z]{0,8}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("vm.info".to_string()),
        Just("vm.pause".to_string()),
        Just("vm.resume".to_string()),
        Just("vcpus".to_string()),
        Just("irq.line".to_string()),
        Just("irq.msi".to_string()),
        Just("nmi".to_string()),
        Just("sipi".to_string()),
        "[0-9]{1,25}",
        "\\PC{0,12}",
    ];
    (any::<bool>(), prop::collection::vec(segment, 0..4)).prop_map(|(prefixed, parts)| {
        let head = if prefixed { "/api/v1/" } else { "/" };
        format!("{head}{}", parts.join("/"))
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        "\\{\"(gsi|address|data|vector|action)\": (-?[0-9]{1,22}|\"[a-z]{0,8}\"|null|\\[\\])\\}"
            .prop_map(String::into_bytes),
        Just(br#"{"gsi": 3, "action": "assert"}"#.to_vec()),
        Just(br#"{"vector": 255}"#.to_vec()),
    ]
}

proptest! {
    #[test]
    fn any_request_gets_a_well_formed_answer(method in method(), path in path(), body in body()) {
        let fake = Fake::default();
        let reply = route(&method, &path, &body, &fake);
        prop_assert!((200..600).contains(&reply.status));
        if reply.status == 204 {
            prop_assert!(reply.body.is_empty());
        } else {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(&reply.body);
            prop_assert!(parsed.is_ok(), "not JSON: {}", reply.body);
            if reply.status >= 400 {
                prop_assert!(serde_json::from_str::<ErrorBody>(&reply.body).is_ok());
            }
        }
    }
}

/// trace.start takes `{"path": ...}` (nothing else), trace.stop answers what it wrote; both
/// refuse the wrong state with 409 and other methods with 405.
#[test]
fn trace_start_and_stop_route() {
    let fake = Fake::default();
    assert_eq!(call(&fake, "PUT", "/api/v1/trace.stop", "").status, 409);
    let bad = call(&fake, "PUT", "/api/v1/trace.start", r#"{"path": 1}"#);
    assert_eq!(bad.status, 400);
    let extra = call(
        &fake,
        "PUT",
        "/api/v1/trace.start",
        r#"{"path": "/t", "x": 1}"#,
    );
    assert_eq!(extra.status, 400);
    let start = call(
        &fake,
        "PUT",
        "/api/v1/trace.start",
        r#"{"path": "/tmp/t.json"}"#,
    );
    assert_eq!(start.status, 204);
    let again = call(
        &fake,
        "PUT",
        "/api/v1/trace.start",
        r#"{"path": "/tmp/t.json"}"#,
    );
    assert_eq!(again.status, 409);
    assert_eq!(call(&fake, "GET", "/api/v1/trace.start", "").status, 405);
    let stop = call(&fake, "PUT", "/api/v1/trace.stop", "");
    assert_eq!(stop.status, 200);
    let stopped: TraceStopped = serde_json::from_str(&stop.body).unwrap();
    assert_eq!(stopped.path, "/tmp/t.json");
}
