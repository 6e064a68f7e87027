//! `openapi.yaml` (repository root) describes the HTTP API as implemented. This test keeps it
//! true:
//! - the document is checked structurally as OpenAPI 3.1 (known fields per object, every `$ref`
//!   resolves, every operation has documented responses, path parameters are declared, every
//!   schema is a valid JSON Schema 2020-12 schema);
//! - the server's route table and the paths of the spec are the same set;
//! - servers with the embedded tiny model answer real requests on a real port, and every
//!   response (status, content type, declared headers, body; every SSE `data:` chunk) is
//!   validated against what the spec declares for that path, method, status and content type;
//! - request bodies the server accepts are valid under the spec's request schemas, and for a
//!   table of boundary values the spec and the server agree on what is valid;
//! - the documented defaults (`max_tokens`, greedy decoding, ...) are what the server does;
//! - every operation and every documented status was exercised (500 excepted: it needs an
//!   internal failure), the demonstration-set endpoints included: the servers of the test share
//!   one temporary storage directory (as replicas would; never the user's data directory).
//!
//! `FLAMINGO_OPENAPI=/path/to/other.yaml` checks another copy of the spec (to see this test
//! fail on a spec that disagrees with the server without editing the real file).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use flamingo_server::config::Config;
use flamingo_server::server::{serve, ModelSource, ServerHandle};
use reqwest::Method;
use serde_json::{json, Value};

const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";
const MODEL: &str = "flamingo-tiny-reference";
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const SCORE: &str = "/v1/score";
const DEMOS: &str = "/v1/demonstrations";
const DEMO: &str = "/v1/demonstrations/{id}";
/// A well-formed demonstration-set id that no set has.
const NO_SET: &str = "demo-000000000000000000000000";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn spec_path() -> PathBuf {
    std::env::var_os("FLAMINGO_OPENAPI").map(PathBuf::from).unwrap_or_else(|| repo().join("openapi.yaml"))
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(repo().join("tests/fixtures/images").join(name)).unwrap();
    let mime = if name.ends_with(".jpg") { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

// ------------------------------------------------------------------------------------------
// The spec
// ------------------------------------------------------------------------------------------

struct Spec {
    doc: Value,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl Spec {
    fn load() -> Self {
        let path = spec_path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let doc: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
        Self { doc, validators: Mutex::new(HashMap::new()) }
    }

    /// The value at a local reference (`#/components/...`).
    fn target(&self, reference: &str) -> Option<&Value> {
        let ptr = reference.strip_prefix('#')?;
        self.doc.pointer(ptr)
    }

    /// Follows `$ref` (Reference Objects: responses, headers, parameters).
    fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..16 {
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) => v = self.target(r).unwrap_or_else(|| panic!("unresolved $ref {r}")),
                None => return v,
            }
        }
        panic!("$ref cycle")
    }

    fn operation(&self, template: &str, method: &Method) -> Option<&Value> {
        self.doc["paths"].get(template)?.get(method.as_str().to_ascii_lowercase())
    }

    fn schema(&self, name: &str) -> Value {
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    /// A validator for `schema`, whose `#/components/...` references resolve in this document.
    fn validator(&self, schema: &Value) -> Arc<jsonschema::Validator> {
        let key = schema.to_string();
        let mut cache = self.validators.lock().unwrap();
        if let Some(v) = cache.get(&key) {
            return v.clone();
        }
        let root = json!({"$schema": DIALECT, "components": self.doc["components"], "allOf": [schema]});
        let v = Arc::new(jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("schema {key} does not compile: {e}")));
        cache.insert(key, v.clone());
        v
    }

    /// The errors of `instance` under `schema` (empty: valid).
    fn errors(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let v = self.validator(schema);
        v.iter_errors(instance).map(|e| format!("{} at `{}` (schema {})", e, e.instance_path(), e.schema_path())).collect()
    }

    fn is_valid(&self, schema: &Value, instance: &Value) -> bool {
        self.validator(schema).is_valid(instance)
    }

    fn request_schema(&self, template: &str) -> Value {
        self.operation(template, &Method::POST).expect("operation")["requestBody"]["content"]["application/json"]["schema"].clone()
    }
}

// ------------------------------------------------------------------------------------------
// Structural checks (OpenAPI 3.1)
// ------------------------------------------------------------------------------------------

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn check_keys(obj: &Value, allowed: &[&str], what: &str, errs: &mut Vec<String>) {
    match obj.as_object() {
        None => errs.push(format!("{what}: must be an object")),
        Some(m) => {
            for k in m.keys() {
                if !allowed.contains(&k.as_str()) && !k.starts_with("x-") {
                    errs.push(format!("{what}: unknown field `{k}`"));
                }
            }
        }
    }
}

/// A Reference Object where an object of `kind` may stand must point into `#/components/{kind}`.
fn check_ref_kind(v: &Value, kind: &str, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        if !r.starts_with(&format!("#/components/{kind}/")) {
            errs.push(format!("{at}: a reference to {kind} must point into #/components/{kind}, not {r}"));
        }
    }
}

/// Every `$ref` in the document, with where it is.
fn all_refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    if let Value::String(r) = x {
                        out.push((at.to_string(), r.clone()));
                    }
                } else {
                    all_refs(x, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                all_refs(x, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Every JSON Schema in the document (component schemas and the `schema` of parameters,
/// headers and media types, plus the `x-sse-event-data` of event streams).
fn all_schemas(spec: &Spec) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for (name, s) in spec.doc["components"]["schemas"].as_object().into_iter().flatten() {
        out.push((format!("#/components/schemas/{name}"), s.clone()));
    }
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, Value)>) {
        if let Value::Object(m) = v {
            for (k, x) in m {
                let here = format!("{at}/{k}");
                if (k == "schema" || k == "x-sse-event-data") && x.is_object() {
                    out.push((here, x.clone()));
                } else if k != "examples" && k != "example" {
                    walk(x, &here, out);
                }
            }
        }
    }
    walk(&spec.doc["paths"], "#/paths", &mut out);
    for part in ["parameters", "headers", "responses"] {
        walk(&spec.doc["components"][part], &format!("#/components/{part}"), &mut out);
    }
    out
}

/// JSON Schema keywords from OpenAPI 3.0 that mean nothing (or something else) in 3.1.
fn openapi30_leftovers(v: &Value, at: &str, errs: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "nullable" {
                    errs.push(format!("{at}: `nullable` is OpenAPI 3.0; use `type: [..., 'null']`"));
                }
                if (k == "exclusiveMinimum" || k == "exclusiveMaximum") && x.is_boolean() {
                    errs.push(format!("{at}: boolean `{k}` is OpenAPI 3.0; use a number"));
                }
                if k != "properties" && k != "examples" && k != "example" {
                    openapi30_leftovers(x, &format!("{at}/{k}"), errs);
                }
                if k == "properties" {
                    for (p, s) in x.as_object().into_iter().flatten() {
                        openapi30_leftovers(s, &format!("{at}/properties/{p}"), errs);
                    }
                }
            }
        }
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| openapi30_leftovers(x, &format!("{at}/{i}"), errs)),
        _ => {}
    }
}

fn structural_errors(spec: &Spec) -> Vec<String> {
    let d = &spec.doc;
    let mut errs = Vec::new();
    check_keys(
        d,
        &["openapi", "info", "jsonSchemaDialect", "servers", "paths", "webhooks", "components", "security", "tags", "externalDocs"],
        "root",
        &mut errs,
    );
    if !d["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")) {
        errs.push(format!("`openapi` must be 3.1.x, got {}", d["openapi"]));
    }
    if !d["info"]["title"].is_string() || !d["info"]["version"].is_string() {
        errs.push("info.title and info.version are required strings".into());
    }
    check_keys(&d["info"], &["title", "summary", "description", "termsOfService", "contact", "license", "version"], "info", &mut errs);

    // Every $ref resolves, locally.
    let mut refs = Vec::new();
    all_refs(d, "#", &mut refs);
    for (at, r) in &refs {
        if !r.starts_with("#/") {
            errs.push(format!("{at}: non-local $ref {r}"));
        } else if spec.target(r).is_none() {
            errs.push(format!("{at}: $ref {r} does not resolve"));
        }
    }
    let schemes: BTreeSet<String> = d["components"]["securitySchemes"].as_object().into_iter().flatten().map(|(k, _)| k.clone()).collect();
    let mut op_ids = BTreeSet::new();
    let paths = d["paths"].as_object().cloned().unwrap_or_default();
    if paths.is_empty() {
        errs.push("no paths".into());
    }
    for (path, item) in &paths {
        let at = format!("paths.{path}");
        if !path.starts_with('/') {
            errs.push(format!("{at}: a path must start with /"));
        }
        let mut allowed: Vec<&str> = METHODS.to_vec();
        allowed.extend(["$ref", "summary", "description", "servers", "parameters"]);
        check_keys(item, &allowed, &at, &mut errs);
        let templated: BTreeSet<String> = path.split('{').skip(1).filter_map(|s| s.split_once('}')).map(|(n, _)| n.to_string()).collect();
        let mut ops = 0;
        for m in METHODS {
            let Some(op) = item.get(*m) else { continue };
            ops += 1;
            let at = format!("{at}.{m}");
            check_keys(
                op,
                &[
                    "tags",
                    "summary",
                    "description",
                    "externalDocs",
                    "operationId",
                    "parameters",
                    "requestBody",
                    "responses",
                    "callbacks",
                    "deprecated",
                    "security",
                    "servers",
                ],
                &at,
                &mut errs,
            );
            for t in op["tags"].as_array().into_iter().flatten() {
                if !d["tags"].as_array().into_iter().flatten().any(|x| x["name"] == *t) {
                    errs.push(format!("{at}: tag {t} is not declared in `tags`"));
                }
            }
            match op["operationId"].as_str() {
                Some(id) if !op_ids.insert(id.to_string()) => errs.push(format!("{at}: duplicate operationId {id}")),
                Some(_) => {}
                None => errs.push(format!("{at}: no operationId")),
            }
            // Parameters (path-level and operation-level).
            let mut declared_path_params = BTreeSet::new();
            for p in item["parameters"].as_array().into_iter().flatten().chain(op["parameters"].as_array().into_iter().flatten()) {
                check_ref_kind(p, "parameters", &format!("{at}.parameters"), &mut errs);
                let p = spec.resolve(p);
                check_keys(
                    p,
                    &[
                        "name",
                        "in",
                        "description",
                        "required",
                        "deprecated",
                        "allowEmptyValue",
                        "style",
                        "explode",
                        "allowReserved",
                        "schema",
                        "example",
                        "examples",
                        "content",
                    ],
                    &format!("{at}.parameters"),
                    &mut errs,
                );
                let (Some(name), Some(loc)) = (p["name"].as_str(), p["in"].as_str()) else {
                    errs.push(format!("{at}: a parameter needs `name` and `in`"));
                    continue;
                };
                if !["query", "header", "path", "cookie"].contains(&loc) {
                    errs.push(format!("{at}: parameter {name}: bad `in` {loc}"));
                }
                if p.get("schema").is_none() == p.get("content").is_none() {
                    errs.push(format!("{at}: parameter {name} needs exactly one of `schema` and `content`"));
                }
                if loc == "path" {
                    if p["required"] != json!(true) {
                        errs.push(format!("{at}: path parameter {name} must be required"));
                    }
                    declared_path_params.insert(name.to_string());
                }
            }
            if declared_path_params != templated {
                errs.push(format!("{at}: path parameters {declared_path_params:?} != template parameters {templated:?}"));
            }
            if let Some(rb) = op.get("requestBody") {
                check_ref_kind(rb, "requestBodies", &format!("{at}.requestBody"), &mut errs);
                let rb = spec.resolve(rb);
                check_keys(rb, &["description", "content", "required"], &format!("{at}.requestBody"), &mut errs);
                if rb["content"].as_object().is_none_or(|c| c.is_empty()) {
                    errs.push(format!("{at}.requestBody: no content"));
                }
            }
            // Security requirements name declared schemes.
            for req in op["security"].as_array().into_iter().flatten() {
                for k in req.as_object().into_iter().flatten().map(|(k, _)| k) {
                    if !schemes.contains(k) {
                        errs.push(format!("{at}: unknown security scheme {k}"));
                    }
                }
            }
            // Responses.
            let responses = op["responses"].as_object().cloned().unwrap_or_default();
            if responses.is_empty() {
                errs.push(format!("{at}: no responses"));
            }
            for (code, r) in &responses {
                let ok_code = code == "default"
                    || (code.len() == 3
                        && code
                            .chars()
                            .enumerate()
                            .all(|(i, c)| if i == 0 { ('1'..='5').contains(&c) } else { c.is_ascii_digit() || c == 'X' }));
                if !ok_code {
                    errs.push(format!("{at}: bad response code {code}"));
                }
                let rat = format!("{at}.responses.{code}");
                check_ref_kind(r, "responses", &rat, &mut errs);
                let r = spec.resolve(r);
                check_keys(r, &["description", "headers", "content", "links"], &rat, &mut errs);
                if !r["description"].is_string() {
                    errs.push(format!("{rat}: a response needs a description"));
                }
                for (h, hv) in r["headers"].as_object().into_iter().flatten() {
                    check_ref_kind(hv, "headers", &format!("{rat}.headers.{h}"), &mut errs);
                    let hv = spec.resolve(hv);
                    check_keys(
                        hv,
                        &["description", "required", "deprecated", "style", "explode", "schema", "example", "examples", "content"],
                        &format!("{rat}.headers.{h}"),
                        &mut errs,
                    );
                    if h.eq_ignore_ascii_case("content-type") {
                        errs.push(format!("{rat}: Content-Type must not be declared as a header"));
                    }
                }
                for (ct, media) in r["content"].as_object().into_iter().flatten() {
                    check_keys(media, &["schema", "example", "examples", "encoding"], &format!("{rat}.content.{ct}"), &mut errs);
                    if media.get("schema").is_none() {
                        errs.push(format!("{rat}.content.{ct}: no schema"));
                    }
                    if ct == "text/event-stream" && media.get("x-sse-event-data").is_none() {
                        errs.push(format!(
                            "{rat}.content.{ct}: an event stream needs `x-sse-event-data` (the schema of each event's data)"
                        ));
                    }
                }
            }
        }
        if ops == 0 {
            errs.push(format!("{at}: no operations"));
        }
    }
    for (name, p) in d["components"]["parameters"].as_object().into_iter().flatten() {
        if p["in"] == "header"
            && ["accept", "content-type", "authorization"].contains(&p["name"].as_str().unwrap_or("").to_ascii_lowercase().as_str())
        {
            errs.push(format!(
                "components.parameters.{name}: header parameters named Accept, Content-Type or Authorization are ignored by OpenAPI"
            ));
        }
    }
    // Every schema is a valid JSON Schema 2020-12 schema, free of OpenAPI 3.0 keywords.
    for (at, s) in all_schemas(spec) {
        let mut s = s;
        if let Some(o) = s.as_object_mut() {
            o.insert("$schema".into(), json!(DIALECT));
        }
        if let Err(e) = jsonschema::meta::validate(&s) {
            errs.push(format!("{at}: not a valid JSON Schema 2020-12 schema: {e}"));
        }
        openapi30_leftovers(&s, &at, &mut errs);
    }
    // Component schemas compile (their references resolve).
    for name in d["components"]["schemas"].as_object().into_iter().flatten().map(|(k, _)| k) {
        let root = json!({"$schema": DIALECT, "components": d["components"], "$ref": format!("#/components/schemas/{name}")});
        if let Err(e) = jsonschema::draft202012::new(&root) {
            errs.push(format!("#/components/schemas/{name}: does not compile: {e}"));
        }
    }
    errs
}

#[test]
fn spec_is_structurally_valid_openapi_3_1() {
    let spec = Spec::load();
    let errs = structural_errors(&spec);
    assert!(errs.is_empty(), "openapi.yaml has problems:\n  {}", errs.join("\n  "));
}

/// The server's routes, from the table its router is built from: `(path with {} for
/// parameters, METHOD)`.
fn server_routes() -> BTreeSet<(String, String)> {
    let out: BTreeSet<(String, String)> =
        flamingo_server::routes::Route::ALL.iter().map(|r| (normalize_path(r.path()), r.method().as_str().to_string())).collect();
    assert!(!out.is_empty(), "no routes in the route table");
    out
}

/// `/v1/models/{*id}` and `/v1/models/{model}` -> `/v1/models/{}`.
fn normalize_path(p: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in p.chars() {
        match c {
            '{' => {
                depth += 1;
                out.push('{');
            }
            '}' => {
                depth -= 1;
                out.push('}');
            }
            _ if depth > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

fn spec_routes(spec: &Spec) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec.doc["paths"].as_object().into_iter().flatten() {
        for m in METHODS {
            if item.get(*m).is_some() {
                out.insert((normalize_path(path), m.to_ascii_uppercase()));
            }
        }
    }
    out
}

#[test]
fn spec_paths_are_the_server_routes() {
    let spec = Spec::load();
    let server = server_routes();
    let documented = spec_routes(&spec);
    let missing: Vec<_> = server.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&server).collect();
    assert!(missing.is_empty(), "routes of the server missing from openapi.yaml: {missing:?}");
    assert!(extra.is_empty(), "openapi.yaml documents routes the server does not have: {extra:?}");
}

// ------------------------------------------------------------------------------------------
// Checking real responses
// ------------------------------------------------------------------------------------------

enum Body {
    None,
    Json(Value),
    Raw(&'static str, Vec<u8>),
    /// A JSON body announced at this length of which only the start ever arrives.
    Stalled(u64),
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    json: Value,
    /// The JSON chunks of an event stream (without `[DONE]`).
    chunks: Vec<Value>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Checker {
    spec: Spec,
    http: reqwest::Client,
    failures: Mutex<Vec<String>>,
    /// (path template, METHOD, status, content type) answered and validated.
    seen: Mutex<BTreeSet<(String, String, String, String)>>,
}

/// `data:` payloads of an SSE body, checking the framing.
fn sse_payloads(text: &str) -> Result<Vec<String>, String> {
    if !text.ends_with("\n\n") {
        return Err("the stream does not end with a blank line".into());
    }
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if line.starts_with(':') {
                continue; // comment (keep-alive)
            }
            match line.strip_prefix("data: ") {
                Some(d) => data.push(d),
                None => return Err(format!("unexpected SSE line {line:?} (only `data: ` lines and comments are documented)")),
            }
        }
        if !data.is_empty() {
            out.push(data.join("\n"));
        }
    }
    Ok(out)
}

impl Checker {
    fn new() -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
        Self { spec: Spec::load(), http, failures: Mutex::new(Vec::new()), seen: Mutex::new(BTreeSet::new()) }
    }

    fn fail(&self, msg: String) {
        eprintln!("MISMATCH: {msg}");
        self.failures.lock().unwrap().push(msg);
    }

    /// Sends a request and validates the reply against the spec entry for `template`
    /// (`None`: a path the spec does not list, answered as `#/components/responses/NotFound`).
    async fn send(&self, base: &str, method: Method, template: Option<&str>, path: &str, body: Body, headers: &[(&str, &str)]) -> Reply {
        let mut rb = self.http.request(method.clone(), format!("{base}{path}"));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let sent = match body {
            Body::None => None,
            Body::Json(v) => {
                rb = rb.json(&v);
                Some(v)
            }
            Body::Raw(ct, bytes) => {
                rb = rb.header("content-type", ct).body(bytes);
                None
            }
            Body::Stalled(len) => {
                let start = futures::stream::once(async { Ok::<_, std::io::Error>(b"{\"messages\": [".to_vec()) });
                let body = reqwest::Body::wrap_stream(futures::StreamExt::chain(start, futures::stream::pending()));
                rb = rb.header("content-type", "application/json").header("content-length", len.to_string()).body(body);
                None
            }
        };
        let r = rb.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let resp_headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let mut reply = Reply { status, headers: resp_headers, json: Value::Null, chunks: Vec::new() };
        let what = format!("{method} {path} -> {status}");
        let response = match template {
            Some(t) => {
                let Some(op) = self.spec.operation(t, &method) else {
                    self.fail(format!("{what}: the spec has no operation {method} {t}"));
                    return reply;
                };
                match op["responses"].get(status.to_string()).or_else(|| op["responses"].get("default")) {
                    Some(r) => self.spec.resolve(r).clone(),
                    None => {
                        self.fail(format!("{what}: status {status} is not documented for {method} {t}; body: {:.300}", text));
                        return reply;
                    }
                }
            }
            None => self.spec.resolve(&json!({"$ref": "#/components/responses/NotFound"})).clone(),
        };
        let ct_full = reply.header("content-type").unwrap_or("").to_string();
        let ct = ct_full.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let Some(media) = response["content"].get(&ct) else {
            self.fail(format!(
                "{what}: content type {ct_full:?} is not documented (documented: {:?})",
                response["content"].as_object().map(|m| m.keys().collect::<Vec<_>>())
            ));
            return reply;
        };
        // Declared headers: present when required, values valid.
        for (name, h) in response["headers"].as_object().into_iter().flatten() {
            let h = self.spec.resolve(h);
            match reply.header(name) {
                None if h["required"] == json!(true) => self.fail(format!("{what}: required header {name} is missing")),
                None => {}
                Some(v) => {
                    let value = if h["schema"]["type"] == "integer" {
                        v.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(v.to_string()))
                    } else {
                        Value::String(v.to_string())
                    };
                    for e in self.spec.errors(&h["schema"], &value) {
                        self.fail(format!("{what}: header {name}: {v:?}: {e}"));
                    }
                }
            }
        }
        // The body.
        let schema = &media["schema"];
        match ct.as_str() {
            "application/json" => match serde_json::from_str::<Value>(&text) {
                Ok(v) => {
                    for e in self.spec.errors(schema, &v) {
                        self.fail(format!("{what}: body does not match the spec: {e}\n    body: {:.600}", v.to_string()));
                    }
                    reply.json = v;
                }
                Err(e) => self.fail(format!("{what}: application/json body is not JSON ({e}): {text:.300}")),
            },
            "text/event-stream" => {
                // The schema describes one event as a client reads it ({"data": ...}); each
                // event's JSON is checked against `x-sse-event-data` in check_stream.
                for payload in sse_payloads(&text).unwrap_or_default() {
                    for e in self.spec.errors(schema, &json!({ "data": payload })) {
                        self.fail(format!("{what}: {e}"));
                    }
                }
                self.check_stream(&what, media, &text, sent.as_ref(), &mut reply);
            }
            _ => {
                for e in self.spec.errors(schema, &Value::String(text.clone())) {
                    self.fail(format!("{what}: {e}"));
                }
            }
        }
        // A request the server accepted is valid under the spec's request schema.
        if let (Some(t), Some(sent), 200 | 201) = (template, &sent, status) {
            if let Some(rs) = self.spec.operation(t, &method).and_then(|op| op["requestBody"]["content"]["application/json"].get("schema"))
            {
                for e in self.spec.errors(rs, sent) {
                    self.fail(format!(
                        "{what}: the server accepted a request the spec calls invalid: {e}\n    request: {:.300}",
                        sent.to_string()
                    ));
                }
            }
        }
        if let Some(t) = template {
            self.seen.lock().unwrap().insert((t.to_string(), method.to_string(), status.to_string(), ct));
        }
        reply
    }

    fn check_stream(&self, what: &str, media: &Value, text: &str, sent: Option<&Value>, reply: &mut Reply) {
        let payloads = match sse_payloads(text) {
            Ok(p) => p,
            Err(e) => return self.fail(format!("{what}: {e}")),
        };
        if payloads.last().map(String::as_str) != Some("[DONE]") {
            self.fail(format!("{what}: the stream does not end with `data: [DONE]`"));
        }
        let event_schema = &media["x-sse-event-data"];
        let n = payloads.len().saturating_sub(1);
        for p in &payloads[..n] {
            let v: Value = match serde_json::from_str(p) {
                Ok(v) => v,
                Err(e) => {
                    self.fail(format!("{what}: event data is not JSON ({e}): {p:.200}"));
                    continue;
                }
            };
            for e in self.spec.errors(event_schema, &v) {
                self.fail(format!("{what}: stream chunk does not match the spec: {e}\n    chunk: {p:.400}"));
            }
            if v.get("error").is_some() {
                self.fail(format!("{what}: the stream carried an error: {p}"));
            }
            reply.chunks.push(v);
        }
        // Documented stream rules: one id; `usage` only with include_usage, null but in the
        // last chunk, which has no choices.
        let include_usage = sent.and_then(|s| s["stream_options"]["include_usage"].as_bool()).unwrap_or(false);
        let chunks = &reply.chunks;
        if chunks.iter().any(|c| c["id"] != chunks[0]["id"] || c["created"] != chunks[0]["created"]) {
            self.fail(format!("{what}: the chunks of one stream have different ids"));
        }
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            match (include_usage, last) {
                (false, _) if c.get("usage").is_some() => self.fail(format!("{what}: `usage` without include_usage: {c}")),
                (true, false) if c.get("usage") != Some(&Value::Null) => self.fail(format!("{what}: chunk {i}: usage must be null: {c}")),
                (true, true) if !(c["usage"].is_object() && c["choices"] == json!([])) => {
                    self.fail(format!("{what}: the last chunk must have `choices: []` and the usage: {c}"))
                }
                _ => {}
            }
        }
    }

    async fn get(&self, base: &str, template: &str, path: &str) -> Reply {
        self.send(base, Method::GET, Some(template), path, Body::None, &[]).await
    }

    async fn post(&self, base: &str, template: &str, body: Value) -> Reply {
        self.send(base, Method::POST, Some(template), template, Body::Json(body), &[]).await
    }

    /// Posts and requires `status`.
    async fn expect(&self, base: &str, template: &str, body: Value, status: u16) -> Reply {
        let shown = format!("{:.300}", body.to_string());
        let r = self.post(base, template, body).await;
        if r.status != status {
            self.fail(format!("POST {template} {shown}: expected {status}, got {} {}", r.status, r.json));
        }
        r
    }
}

// ------------------------------------------------------------------------------------------
// Servers
// ------------------------------------------------------------------------------------------

/// Where the test's servers store demonstration sets (never the user's data directory). The
/// servers of the test share it, as replicas behind one load balancer would.
fn storage_dir() -> PathBuf {
    std::env::temp_dir().join(format!("flamingo-openapi-{}", std::process::id()))
}

fn cfg() -> Config {
    let mut c = Config::defaults();
    c.server.port = 0;
    c.server.shutdown_grace_seconds = 10;
    c.server.served_model_name = MODEL.into();
    c.storage.dir = storage_dir().to_string_lossy().into_owned();
    c
}

async fn start(c: Config) -> (ServerHandle, String) {
    let handle =
        serve(c, ModelSource::Dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/mosaicgpt_x1")), false)
            .await
            .expect("server starts");
    let base = format!("http://{}", handle.addr);
    let http = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = http.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                return (handle, base);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the model did not load");
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn merge(base: &Value, extra: &Value) -> Value {
    let mut out = base.clone();
    for (k, v) in extra.as_object().unwrap() {
        out[k] = v.clone();
    }
    out
}

// ------------------------------------------------------------------------------------------
// The main test: real requests against the spec
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_match_the_spec() {
    let c = Checker::new();
    let _ = std::fs::remove_dir_all(storage_dir());
    let (handle, base) = start(cfg()).await;
    let b = base.as_str();

    // ---- operations
    c.get(b, "/health", "/health").await;
    let m = c.get(b, "/metrics", "/metrics").await;
    assert_eq!(m.status, 200);
    let list = c.get(b, "/v1/models", "/v1/models").await;
    assert_eq!(list.json["data"][0]["id"], MODEL);
    let card = c.get(b, "/v1/models/{model}", &format!("/v1/models/{MODEL}")).await;
    assert_eq!(card.status, 200);
    assert_eq!(card.json, list.json["data"][0], "the model card is the list's entry");
    for missing in
        ["/v1/models/gpt-4o", "/v1/models/openflamingo/OpenFlamingo-3B-vitl-mpt1b", "/v1/models/openflamingo%2FOpenFlamingo-3B-vitl-mpt1b"]
    {
        let r = c.get(b, "/v1/models/{model}", missing).await;
        assert_eq!(r.status, 404, "{missing}");
        assert_eq!(r.json["error"]["code"], "model_not_found");
    }
    // Unknown routes: 404 in the documented error shape.
    for (method, path) in [(Method::GET, "/v1/nothing"), (Method::POST, "/v2/chat/completions"), (Method::GET, "/")] {
        let r = c.send(b, method, None, path, Body::None, &[]).await;
        assert_eq!(r.status, 404);
    }
    // A listed path with a method the spec does not list: 405 in the OpenAI error shape
    // (documented in the introduction).
    for (path, item) in c.spec.doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{model}", MODEL).replace("{id}", NO_SET);
        for m in [Method::GET, Method::POST, Method::DELETE] {
            if item.get(m.as_str().to_ascii_lowercase()).is_some() {
                continue;
            }
            let r = c.http.request(m.clone(), format!("{b}{concrete}")).send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            let shaped = serde_json::from_str::<Value>(&text).is_ok_and(|v| {
                v["error"]["message"].is_string() && v["error"]["type"] == "invalid_request_error" && v["error"].get("param").is_some()
            });
            if status != 405 || !shaped {
                c.fail(format!("{m} {concrete}: the spec says 405 in the error shape, the server answered {status} {text:.200}"));
            }
        }
    }
    // Request ids: a valid one is echoed, an invalid one replaced.
    let r = c.send(b, Method::GET, Some("/health"), "/health", Body::None, &[("x-request-id", "req-42_a.b")]).await;
    assert_eq!(r.header("x-request-id"), Some("req-42_a.b"));
    let r = c.send(b, Method::GET, Some("/health"), "/health", Body::None, &[("x-request-id", "no spaces")]).await;
    assert!(r.header("x-request-id").is_some_and(|v| v != "no spaces"));

    // ---- chat completions
    let img = |u: String| json!({"type": "image_url", "image_url": {"url": u}});
    let few_shot = json!({
        "model": MODEL, "max_tokens": 6, "return_token_ids": true,
        "messages": [
            {"role": "system", "content": "Describe."},
            {"role": "user", "content": [img(data_url("chelsea.png")), {"type": "text", "text": "Output:"}]},
            {"role": "assistant", "content": "two cats."},
            {"role": "assistant", "content": [{"type": "text", "text": " more"}]},
            {"role": "developer", "content": [{"type": "image_url", "image_url": {"url": data_url("coffee.jpg"), "detail": "low"}}, {"type": "text", "text": "Output:"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": data_url("small.png")}]},
        ]
    });
    let r = c.expect(b, CHAT, few_shot.clone(), 200).await;
    let u = &r.json["usage"];
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()));
    assert_eq!(r.json["choices"][0]["token_ids"].as_array().unwrap().len() as u64, u["completion_tokens"].as_u64().unwrap());
    // The same prompt again: cached tokens reported.
    let again = c.expect(b, CHAT, few_shot.clone(), 200).await;
    assert!(again.json["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);

    // Drift detection: the validator rejects a changed response (so this test can fail).
    let chat_schema = c.spec.schema("ChatCompletion");
    let mut mutated = r.json.clone();
    mutated.as_object_mut().unwrap().remove("usage");
    assert!(!c.spec.is_valid(&chat_schema, &mutated), "a response without `usage` must not validate");
    let mut mutated = r.json.clone();
    mutated["choices"][0]["finish_reason"] = json!("eos");
    assert!(!c.spec.is_valid(&chat_schema, &mutated), "an undocumented finish_reason must not validate");
    let mut mutated = r.json.clone();
    mutated["choices"][0]["message"]["surprise"] = json!(1);
    assert!(!c.spec.is_valid(&chat_schema, &mutated), "an undocumented field must not validate");

    // n > 1 with sampling and a seed; stop strings.
    let r = c.expect(b, CHAT, json!({"messages": user("A photo of"), "max_tokens": 6, "n": 3, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "return_token_ids": true}), 200).await;
    assert_eq!(r.json["choices"].as_array().unwrap().len(), 3);
    let stop = stop_string(&c, b).await;
    let r = c.expect(b, CHAT, json!({"messages": user("A photo of"), "max_tokens": 16, "stop": ["\u{1F600}never", stop]}), 200).await;
    assert_eq!(r.json["choices"][0]["finish_reason"], "stop");
    let r = c
        .expect(
            b,
            CHAT,
            json!({"messages": user("A photo of"), "max_completion_tokens": 3, "stop": "\u{1F600}never", "repetition_penalty": 1.3}),
            200,
        )
        .await;
    assert_eq!(r.json["choices"][0]["finish_reason"], "length");
    // Log-probabilities.
    let r = c.expect(b, CHAT, json!({"messages": user("hi"), "max_tokens": 4, "logprobs": true, "top_logprobs": 3}), 200).await;
    assert_eq!(r.json["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().map(Vec::len), Some(3));
    c.expect(b, CHAT, json!({"messages": user("hi"), "max_tokens": 3, "logprobs": true}), 200).await;
    // Beam search.
    c.expect(
        b,
        CHAT,
        json!({"messages": user("A photo of"), "max_tokens": 5, "num_beams": 3, "length_penalty": 0.5, "return_token_ids": true}),
        200,
    )
    .await;
    // Unknown fields are ignored.
    c.expect(
        b,
        CHAT,
        json!({"messages": user("hi"), "max_tokens": 2, "tools": [], "presence_penalty": 0.5, "user": "u1", "frobnicate": {"x": 1}}),
        200,
    )
    .await;

    // ---- chat streams
    let s = c
        .expect(b, CHAT, json!({"messages": user("A photo of"), "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 1, "logprobs": true, "top_logprobs": 2, "stream": true, "stream_options": {"include_usage": true}}), 200)
        .await;
    assert!(s.header("content-type").unwrap().starts_with("text/event-stream"));
    assert!(s.chunks.iter().any(|c| c["choices"][0]["logprobs"]["content"].is_array()), "streamed logprobs");
    assert!(s.chunks.iter().any(|c| c["choices"][0]["index"] == 1), "both choices streamed");
    c.expect(b, CHAT, json!({"messages": user("A photo of"), "max_tokens": 4, "stream": true, "return_token_ids": true}), 200).await;
    c.expect(
        b,
        CHAT,
        json!({"messages": user("A photo of"), "max_tokens": 4, "num_beams": 2, "stream": true, "stream_options": {"include_usage": true}}),
        200,
    )
    .await;
    let r = c.expect(b, CHAT, json!({"messages": user("A photo of"), "max_tokens": 16, "stop": stop, "stream": true}), 200).await;
    assert_eq!(r.chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // ---- completions
    let r = c
        .expect(b, COMPLETIONS, json!({"model": MODEL, "prompt": "<image>Output: two cats.<|endofchunk|><image>Output:", "images": [data_url("chelsea.png"), {"url": data_url("coffee.jpg")}], "max_tokens": 5, "return_token_ids": true}), 200)
        .await;
    assert!(r.json["choices"][0]["token_ids"].is_array());
    let r = c.expect(b, COMPLETIONS, json!({"prompt": ["A photo of"], "max_tokens": 4, "logprobs": 2, "n": 2, "temperature": 0.7, "seed": 3, "echo": false, "suffix": ""}), 200).await;
    // A map keyed by token text: tokens that decode alike (partial UTF-8 characters all show as
    // U+FFFD) share one key, so a map may hold fewer than `logprobs` entries (documented).
    let tops = r.json["choices"][1]["logprobs"]["top_logprobs"].as_array().unwrap();
    assert!(tops.iter().all(|t| (1..=2).contains(&t.as_object().unwrap().len())));
    c.expect(b, COMPLETIONS, json!({"prompt": "A photo of", "max_tokens": 3, "logprobs": 0}), 200).await;
    c.expect(
        b,
        COMPLETIONS,
        json!({"prompt": "<image>Output:", "images": [data_url("small.png")], "max_tokens": 4, "num_beams": 3, "length_penalty": 0.0}),
        200,
    )
    .await;
    let r = c.expect(b, COMPLETIONS, json!({"prompt": "A photo of", "max_tokens": 16, "stop": [stop]}), 200).await;
    assert_eq!(r.json["choices"][0]["finish_reason"], "stop");
    let r = c.expect(b, COMPLETIONS, json!({"prompt": "A photo of", "max_tokens": 16, "stop": stop, "stream": true}), 200).await;
    assert_eq!(r.chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    // Streams.
    let s = c
        .expect(b, COMPLETIONS, json!({"prompt": "A photo of", "max_tokens": 5, "n": 2, "logprobs": 1, "temperature": 0.5, "seed": 9, "stream": true, "stream_options": {"include_usage": true}}), 200)
        .await;
    assert!(s.chunks.iter().any(|c| c["choices"][0]["logprobs"]["tokens"].is_array()), "streamed logprobs");
    c.expect(b, COMPLETIONS, json!({"prompt": "<image>Output:", "images": [data_url("small.png")], "max_tokens": 4, "stream": true}), 200)
        .await;
    c.expect(
        b,
        COMPLETIONS,
        json!({"prompt": "A photo of", "max_tokens": 4, "num_beams": 2, "stream": true, "stream_options": {"include_usage": false}}),
        200,
    )
    .await;

    // ---- client errors
    for path in [CHAT, COMPLETIONS] {
        let r = c.send(b, Method::POST, Some(path), path, Body::Raw("application/json", b"{\"messages\": [".to_vec()), &[]).await;
        assert_eq!(r.status, 400);
        let other =
            if path == CHAT { json!({"model": "gpt-4o", "messages": user("x")}) } else { json!({"model": "gpt-4o", "prompt": "x"}) };
        let r = c.expect(b, path, other, 404).await;
        assert_eq!(r.json["error"]["param"], "model");
    }
    let r = c.expect(b, CHAT, json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}), 400).await;
    assert_eq!(r.json["error"]["param"], "messages[0].content[0].type");
    c.expect(
        b,
        CHAT,
        json!({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url("small.png")}}]}]}),
        400,
    )
    .await;
    // echo: the prompt before the text; with max_tokens 0 the prompt alone, with its
    // log-probabilities (the first token's null).
    let prompt = "<image>Output: two cats.";
    let echoed = json!({"prompt": prompt, "images": [data_url("small.png")], "echo": true, "logprobs": 2});
    let r = c.expect(b, COMPLETIONS, merge(&echoed, &json!({"max_tokens": 0})), 200).await;
    let choice = &r.json["choices"][0];
    assert_eq!((&choice["text"], &choice["finish_reason"]), (&json!(prompt), &json!("length")));
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len() as u64, r.json["usage"]["prompt_tokens"].as_u64().unwrap());
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    assert!(lp["token_logprobs"][1].is_number());
    assert_eq!(r.json["usage"]["completion_tokens"], 0);
    let r = c.expect(b, COMPLETIONS, merge(&echoed, &json!({"max_tokens": 3, "return_token_ids": true})), 200).await;
    let choice = &r.json["choices"][0];
    assert!(choice["text"].as_str().unwrap().starts_with(prompt));
    let generated = choice["token_ids"].as_array().unwrap().len() - usize::from(choice["finish_reason"] == "stop");
    assert_eq!(choice["logprobs"]["tokens"].as_array().unwrap().len(), lp["tokens"].as_array().unwrap().len() + generated);
    let r = c.expect(b, COMPLETIONS, json!({"prompt": "A photo of", "echo": true, "max_tokens": 2}), 200).await;
    assert!(r.json["choices"][0]["text"].as_str().unwrap().starts_with("A photo of") && r.json["choices"][0]["logprobs"].is_null());
    for bad in [json!({"stream": true}), json!({"demonstrations": {"id": NO_SET}})] {
        let r = c.expect(b, COMPLETIONS, merge(&json!({"prompt": "A photo of", "echo": true}), &bad), 400).await;
        assert_eq!(r.json["error"]["param"], "echo");
    }
    c.expect(b, COMPLETIONS, json!({"prompt": "A photo of", "max_tokens": 0}), 400).await;
    c.expect(b, CHAT, json!({"messages": user(&"word ".repeat(3000))}), 400).await;

    // ---- documented defaults are what the server does
    check_defaults(&c, b).await;
    // ---- the spec and the server agree on what is valid
    check_probes(&c, b).await;
    // ---- demonstration sets and scoring
    let chat_set = check_demonstrations(&c, b).await;
    let chat_id = chat_set["id"].as_str().unwrap().to_string();

    handle.shutdown().await.unwrap();

    // ---- authentication, overload, body size
    let mut cfg2 = cfg();
    cfg2.server.api_keys = vec!["sk-test".into()];
    cfg2.engine.max_waiting = 0;
    cfg2.server.retry_after_seconds = 3;
    cfg2.limits.max_body_bytes = 4096;
    let (handle, base) = start(cfg2).await;
    let b = base.as_str();
    let key = [("authorization", "Bearer sk-test")];
    // This server shares the storage directory with the first one (a replica): it knows the
    // chat set from the store, but max_waiting = 0 refuses the engine work of pinning it (429),
    // as it refuses every generation, scoring and registration.
    for (method, template, path, body, want) in [
        (Method::GET, "/v1/models", "/v1/models".to_string(), None, 200),
        (Method::GET, "/v1/models/{model}", format!("/v1/models/{MODEL}"), None, 200),
        (Method::POST, CHAT, CHAT.to_string(), Some(json!({"messages": user("x"), "max_tokens": 2})), 429),
        (Method::POST, COMPLETIONS, COMPLETIONS.to_string(), Some(json!({"prompt": "x", "max_tokens": 2})), 429),
        (Method::POST, SCORE, SCORE.to_string(), Some(json!({"prompt": "A photo of", "candidates": [" a cat."]})), 429),
        (Method::POST, DEMOS, DEMOS.to_string(), Some(json!({"examples": [{"prompt": "A photo of a cat.<|endofchunk|>"}]})), 429),
        (Method::GET, DEMOS, DEMOS.to_string(), None, 200),
        (Method::GET, DEMO, format!("{DEMOS}/{chat_id}"), None, 429),
        (Method::DELETE, DEMO, format!("{DEMOS}/{NO_SET}"), None, 404),
    ] {
        let body = || body.clone().map(Body::Json).unwrap_or(Body::None);
        let r = c.send(b, method.clone(), Some(template), &path, body(), &[]).await;
        assert_eq!(r.status, 401, "{method} {path} without a key");
        assert_eq!(r.json["error"]["code"], "invalid_api_key");
        let r = c.send(b, method.clone(), Some(template), &path, body(), &[("authorization", "Bearer sk-wrong")]).await;
        assert_eq!(r.status, 401);
        let r = c.send(b, method.clone(), Some(template), &path, body(), &key).await;
        assert_eq!(r.status, want, "{method} {path} with the key: {}", r.json);
        if want == 429 {
            assert_eq!(r.header("retry-after"), Some("3"), "{method} {path}");
        }
        if method == Method::POST {
            let big = match template {
                CHAT => json!({"messages": user(&"x".repeat(5000))}),
                SCORE => json!({"prompt": "x".repeat(5000), "candidates": ["a"]}),
                DEMOS => json!({"examples": [{"prompt": "x".repeat(5000)}]}),
                _ => json!({"prompt": "x".repeat(5000)}),
            };
            let r = c.send(b, Method::POST, Some(template), &path, Body::Json(big), &key).await;
            assert_eq!(r.status, 413);
            assert_eq!(r.json["error"]["code"], "request_too_large");
        }
    }
    let r = c.send(b, Method::GET, Some(DEMOS), DEMOS, Body::None, &key).await;
    assert!(r.json["data"].as_array().unwrap().iter().all(|s| s["id"] != chat_id.as_str()), "a set this replica cannot pin is not listed");
    // /health needs no key; /metrics needs one unless server.public_metrics opens it.
    assert_eq!(c.get(b, "/health", "/health").await.status, 200);
    assert_eq!(c.get(b, "/metrics", "/metrics").await.status, 401);
    assert_eq!(c.send(b, Method::GET, Some("/metrics"), "/metrics", Body::None, &key).await.status, 200);
    handle.shutdown().await.unwrap();

    // ---- a body that does not arrive within the client timeout: 408
    let mut slow = cfg();
    slow.server.client_timeout_seconds = 1;
    let (handle, base) = start(slow).await;
    for template in [CHAT, COMPLETIONS, SCORE, DEMOS] {
        let r = c.send(&base, Method::POST, Some(template), template, Body::Stalled(1000), &[]).await;
        assert_eq!((r.status, r.json["error"]["code"].as_str()), (408, Some("request_timeout")), "{template}: {}", r.json);
    }
    handle.shutdown().await.unwrap();

    // ---- a server whose model is not loaded: 503
    let st = flamingo_server::server::AppState::new(cfg(), "not-loaded".into()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, flamingo_server::server::router(st)).await });
    let base = format!("http://{addr}");
    let b = base.as_str();
    let r = c.get(b, "/health", "/health").await;
    assert_eq!((r.status, r.json["status"].as_str()), (503, Some("loading")));
    c.expect(b, CHAT, json!({"messages": user("x")}), 503).await;
    c.expect(b, COMPLETIONS, json!({"prompt": "x"}), 503).await;
    c.expect(b, SCORE, json!({"prompt": "x", "candidates": ["a"]}), 503).await;
    c.expect(b, DEMOS, json!({"examples": [{"prompt": "x"}]}), 503).await;
    assert_eq!(c.get(b, DEMOS, DEMOS).await.status, 503);
    assert_eq!(get_set(&c, b, &chat_id).await.status, 503);
    assert_eq!(delete_set(&c, b, &chat_id).await.status, 503);
    let r = c.get(b, "/v1/models", "/v1/models").await;
    assert_eq!(r.json["data"][0]["id"], "not-loaded");
    task.abort();

    // ---- a replica whose pinned memory (engine.pinned_bytes) is too small for the sets
    let mut small = cfg();
    small.engine.pinned_bytes = 1;
    let (handle, base) = start(small).await;
    let b = base.as_str();
    let r = get_set(&c, b, &chat_id).await;
    assert_eq!(r.status, 400, "a stored set this replica cannot pin: {}", r.json);
    let r = c.expect(b, DEMOS, json!({"examples": [raw_example("coffee.jpg", "a cup of coffee.")]}), 400).await;
    assert!(r.json["error"]["message"].as_str().unwrap().contains("pinned"), "{}", r.json);
    handle.shutdown().await.unwrap();

    // ---- a replica sharing the storage: it restores the sets at start, under the same ids
    let (handle, base) = start(cfg()).await;
    let b = base.as_str();
    let r = get_set(&c, b, &chat_id).await;
    assert_eq!(r.json, chat_set, "the set, as the replica that registered it described it");
    let r = c.get(b, DEMOS, DEMOS).await;
    assert!(r.json["data"].as_array().unwrap().contains(&chat_set), "restored at start: {}", r.json);
    let r = delete_set(&c, b, &chat_id).await;
    assert_eq!(r.status, 200);
    assert!(!storage_dir().join("demonstrations").join(format!("{chat_id}.json")).exists(), "the stored file is removed");
    assert_eq!(get_set(&c, b, &chat_id).await.status, 404);
    handle.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(storage_dir());

    // ---- coverage: every operation, status and content type of the spec was exercised
    let seen = c.seen.lock().unwrap().clone();
    let mut not_exercised = Vec::new();
    for (path, item) in c.spec.doc["paths"].as_object().unwrap() {
        for m in METHODS {
            let Some(op) = item.get(*m) else { continue };
            let method = m.to_ascii_uppercase();
            for (status, resp) in op["responses"].as_object().unwrap() {
                // A 500 needs a failure inside the server (generation or detokenization).
                if status == "500" {
                    continue;
                }
                for ct in c.spec.resolve(resp)["content"].as_object().unwrap().keys() {
                    if !seen.contains(&(path.clone(), method.clone(), status.clone(), ct.clone())) {
                        not_exercised.push(format!("{method} {path} {status} {ct}"));
                    }
                }
            }
        }
    }
    eprintln!("validated {} distinct (path, method, status, content type) combinations:", seen.len());
    for s in &seen {
        eprintln!("  {s:?}");
    }
    let failures = c.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "the server and openapi.yaml disagree ({} problems):\n- {}", failures.len(), failures.join("\n- "));
    assert!(not_exercised.is_empty(), "documented but never exercised by this test:\n  {}", not_exercised.join("\n  "));
}

/// The `default` of every request field is what the server does when the field is absent.
async fn check_defaults(c: &Checker, b: &str) {
    let prop = |schema: &str, field: &str| -> Value {
        let s = &c.spec.doc["components"]["schemas"][schema];
        s["properties"]
            .get(field)
            .cloned()
            .unwrap_or_else(|| c.spec.doc["components"]["schemas"]["GenerationParameters"]["properties"][field].clone())
    };
    // max_tokens: "hello world" makes the tiny model talk for about a thousand tokens.
    for (path, schema, body) in [
        (CHAT, "ChatCompletionRequest", json!({"messages": user("hello world")})),
        (COMPLETIONS, "CompletionRequest", json!({"prompt": "hello world"})),
    ] {
        let default = prop(schema, "max_tokens")["default"].as_u64().expect("max_tokens has a default");
        assert_eq!(prop(schema, "max_completion_tokens")["default"].as_u64(), Some(default));
        let r = c.expect(b, path, body, 200).await;
        assert_eq!(r.json["choices"][0]["finish_reason"], "length", "{path}: the answer is longer than the default max_tokens");
        assert_eq!(r.json["usage"]["completion_tokens"].as_u64(), Some(default), "{path}: the documented max_tokens default");
    }
    // Every generation parameter with a default: giving the default changes nothing, with
    // greedy decoding and with seeded sampling.
    let gp = c.spec.doc["components"]["schemas"]["GenerationParameters"]["properties"].as_object().unwrap().clone();
    for (path, base) in [
        (CHAT, json!({"messages": user("A photo of"), "max_tokens": 6, "return_token_ids": true})),
        (COMPLETIONS, json!({"prompt": "A photo of", "max_tokens": 6, "return_token_ids": true})),
    ] {
        for sampling in [json!({}), json!({"temperature": 1.0, "seed": 11})] {
            let base = merge(&base, &sampling);
            let want = c.expect(b, path, base.clone(), 200).await;
            for (field, s) in &gp {
                let Some(default) = s.get("default") else { continue };
                if matches!(field.as_str(), "stream" | "stream_options" | "return_token_ids") || sampling.get(field).is_some() {
                    continue;
                }
                let got = c.expect(b, path, merge(&base, &json!({field.clone(): default.clone()})), 200).await;
                let ids = |r: &Reply| r.json["choices"].as_array().map(|a| a.iter().map(|c| c["token_ids"].clone()).collect::<Vec<_>>());
                if ids(&got) != ids(&want) {
                    c.fail(format!("{path}: `{field}: {default}` (its documented default) changes the answer of {base}"));
                }
            }
        }
        // Absent flags: no token ids, no log-probabilities, no stream.
        let mut plain = base.clone();
        plain.as_object_mut().unwrap().remove("return_token_ids");
        let r = c.expect(b, path, plain, 200).await;
        assert!(r.json["choices"][0].get("token_ids").is_none(), "return_token_ids defaults to false");
        assert!(r.json["choices"][0]["logprobs"].is_null(), "logprobs default to none");
    }
    // Greedy by default: repeatable, and the same as temperature 0.
    let body = json!({"messages": user("A photo of"), "max_tokens": 8, "n": 2, "return_token_ids": true});
    let a = c.expect(b, CHAT, body.clone(), 200).await;
    let t0 = c.expect(b, CHAT, merge(&body, &json!({"temperature": 0})), 200).await;
    assert_eq!(
        a.json["choices"][0]["token_ids"], a.json["choices"][1]["token_ids"],
        "without temperature every choice is the greedy answer"
    );
    assert_eq!(a.json["choices"][0]["token_ids"], t0.json["choices"][0]["token_ids"]);
    assert_eq!(prop("GenerationParameters", "temperature")["default"], json!(0));
}

/// Boundary values: the spec's request schema and the server agree on what is valid.
///
/// Field probes are sent with an otherwise failing request whose failure comes after all
/// field checks (chat: a `tool` message, rejected by the template; completions: an `<image>`
/// without an image), so the error's `param` tells whether the fields passed without
/// generating anything. The spec is asked about the same fields on a valid request.
async fn check_probes(c: &Checker, b: &str) {
    let shared: Vec<(Value, bool)> = vec![
        (json!({"max_tokens": 0}), false),
        (json!({"max_tokens": 1}), true),
        (json!({"max_tokens": 1024}), true),
        (json!({"max_tokens": 1025}), false),
        (json!({"max_tokens": -1}), false),
        (json!({"max_tokens": "lots"}), false),
        (json!({"max_tokens": null}), true),
        (json!({"max_completion_tokens": 0}), false),
        (json!({"max_completion_tokens": 1024}), true),
        (json!({"max_completion_tokens": 1025}), false),
        (json!({"temperature": -0.01}), false),
        (json!({"temperature": 0}), true),
        (json!({"temperature": 2}), true),
        (json!({"temperature": 2.01}), false),
        (json!({"temperature": "1"}), false),
        (json!({"top_p": 0}), false),
        (json!({"top_p": 0.001}), true),
        (json!({"top_p": 1}), true),
        (json!({"top_p": 1.01}), false),
        (json!({"top_p": null}), true),
        (json!({"n": 0}), false),
        (json!({"n": 1}), true),
        (json!({"n": 8}), true),
        (json!({"n": 9}), false),
        (json!({"n": 1.5}), false),
        (json!({"seed": -1}), true),
        (json!({"seed": 9223372036854775807_i64}), true),
        (json!({"seed": 9223372036854775808_u64}), false),
        (json!({"seed": 0.5}), false),
        (json!({"stop": ""}), false),
        (json!({"stop": "x"}), true),
        (json!({"stop": []}), true),
        (json!({"stop": [""]}), false),
        (json!({"stop": ["a", "b", "c", "d", "e", "f", "g", "h"]}), true),
        (json!({"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}), false),
        (json!({"stop": 3}), false),
        (json!({"stop": null}), true),
        (json!({"stream": true}), true),
        (json!({"stream": "yes"}), false),
        (json!({"stream_options": {"include_usage": true}}), true),
        (json!({"stream_options": {"include_usage": "yes"}}), false),
        (json!({"stream_options": null}), true),
        (json!({"top_k": -2}), false),
        (json!({"top_k": -1}), true),
        (json!({"top_k": 0}), true),
        (json!({"top_k": 40}), true),
        (json!({"repetition_penalty": 0}), false),
        (json!({"repetition_penalty": -1}), false),
        (json!({"repetition_penalty": 0.5}), true),
        (json!({"num_beams": 0}), false),
        (json!({"num_beams": 1}), true),
        (json!({"num_beams": 8}), true),
        (json!({"num_beams": 9}), false),
        (json!({"num_beams": 2, "temperature": 0.5}), false),
        (json!({"num_beams": 2, "temperature": 0}), true),
        (json!({"num_beams": 2, "n": 2}), false),
        (json!({"num_beams": 2, "n": 1}), true),
        (json!({"num_beams": 1, "n": 3, "temperature": 1}), true),
        (json!({"length_penalty": -3.5}), true),
        (json!({"length_penalty": "long"}), false),
        (json!({"return_token_ids": true}), true),
        (json!({"return_token_ids": 1}), false),
        (json!({"model": MODEL}), true),
        (json!({"model": null}), true),
        (json!({"model": 5}), false),
        (json!({"tools": [{"type": "function"}], "response_format": {"type": "json_object"}, "whatever": 1}), true),
        // The demonstrations extension (the set is looked up after every field was checked).
        (json!({"demonstrations": {"id": NO_SET}}), true),
        (json!({"demonstrations": {"id": "not-a-set-id", "k": 2}}), true),
        (json!({"demonstrations": {"id": NO_SET, "k": null}}), true),
        (json!({"demonstrations": null}), true),
        (json!({"demonstrations": NO_SET}), false),
        (json!({"demonstrations": {}}), false),
        (json!({"demonstrations": {"id": 5}}), false),
        (json!({"demonstrations": {"k": 2}}), false),
        (json!({"demonstrations": {"id": NO_SET, "k": -1}}), false),
        (json!({"demonstrations": {"id": NO_SET, "k": 1.5}}), false),
        (json!({"demonstrations": {"id": NO_SET, "k": "2"}}), false),
        (json!({"demonstrations": {"id": NO_SET, "top": 2}}), false),
    ];
    let chat_only: Vec<(Value, bool)> = vec![
        (json!({"logprobs": true}), true),
        (json!({"logprobs": "yes"}), false),
        (json!({"logprobs": true, "top_logprobs": 20}), true),
        (json!({"logprobs": true, "top_logprobs": 21}), false),
        (json!({"logprobs": true, "top_logprobs": -1}), false),
        (json!({"top_logprobs": 2}), false),
        (json!({"logprobs": false, "top_logprobs": 2}), false),
        (json!({"top_logprobs": 0}), true),
        (json!({"num_beams": 2, "logprobs": true}), false),
        (json!({"num_beams": 2, "logprobs": false}), true),
    ];
    let completion_only: Vec<(Value, bool)> = vec![
        (json!({"logprobs": 0}), true),
        (json!({"logprobs": 20}), true),
        (json!({"logprobs": 21}), false),
        (json!({"logprobs": -1}), false),
        (json!({"logprobs": true}), false),
        (json!({"num_beams": 2, "logprobs": 0}), false),
        (json!({"echo": true}), true),
        (json!({"echo": false}), true),
        (json!({"echo": null}), true),
        (json!({"echo": "yes"}), false),
        (json!({"echo": true, "max_tokens": 0}), true),
        (json!({"echo": true, "max_tokens": 0, "logprobs": 3}), true),
        (json!({"echo": false, "max_tokens": 0}), false),
        (json!({"echo": true, "max_tokens": 0, "max_completion_tokens": 0}), false),
        (json!({"echo": true, "stream": true}), false),
        (json!({"echo": true, "stream": false}), true),
        (json!({"echo": true, "demonstrations": {"id": NO_SET}}), false),
        (json!({"echo": true, "demonstrations": null}), true),
        (json!({"suffix": ""}), true),
        (json!({"suffix": "end"}), false),
        (json!({"prompt": ["<image>"]}), true),
        (json!({"prompt": []}), false),
        (json!({"prompt": ["<image>", "<image>"]}), false),
        (json!({"prompt": ""}), false),
        (json!({"prompt": [""]}), false),
        (json!({"prompt": [1, 2]}), false),
        (json!({"prompt": 5}), false),
    ];
    let chat_schema = c.spec.request_schema(CHAT);
    let completion_schema = c.spec.request_schema(COMPLETIONS);
    let chat_valid = json!({"messages": user("x")});
    let chat_sent = json!({"messages": [{"role": "tool", "content": "x"}]});
    let comp_valid = json!({"prompt": "<image>", "images": [data_url("small.png")]});
    let comp_sent = json!({"prompt": "<image>"});
    let cases = shared
        .iter()
        .map(|(f, ok)| (CHAT, f, *ok))
        .chain(shared.iter().map(|(f, ok)| (COMPLETIONS, f, *ok)))
        .chain(chat_only.iter().map(|(f, ok)| (CHAT, f, *ok)))
        .chain(completion_only.iter().map(|(f, ok)| (COMPLETIONS, f, *ok)));
    for (path, fields, expected) in cases {
        let (schema, valid, sent, signal) = if path == CHAT {
            (&chat_schema, &chat_valid, &chat_sent, "messages[0].role")
        } else {
            (&completion_schema, &comp_valid, &comp_sent, "images")
        };
        let spec_ok = c.spec.is_valid(schema, &merge(valid, fields));
        let mut sent = merge(sent, fields);
        if path == COMPLETIONS && fields.get("prompt").is_some() {
            // The prompt itself is probed: keep it, drop the image it would need.
            sent.as_object_mut().unwrap().remove("images");
        }
        let r = c.expect(b, path, sent, 400).await;
        let server_ok = r.json["error"]["param"] == signal;
        if spec_ok != expected {
            c.fail(format!("{path} {fields}: the spec calls it {}, the probe table {}", valid_str(spec_ok), valid_str(expected)));
        }
        if spec_ok != server_ok {
            c.fail(format!(
                "{path} {fields}: the spec calls it {}, the server {} ({})",
                valid_str(spec_ok),
                valid_str(server_ok),
                r.json["error"]["message"]
            ));
        }
    }

    // Message and content-part shapes: sent as they are. Accepted: 200, or a 400 raised only
    // after the structure was accepted (fetching the media; a model without video support).
    let bad_url = "ftp://example.invalid/a.png";
    let part = |p: Value| json!([{"role": "user", "content": [p]}]);
    let messages: Vec<(Value, bool)> = vec![
        (user("x"), true),
        (json!([{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}, {"role": "user", "content": "c"}]), true),
        (json!([{"role": "assistant"}]), true),
        (json!([{"role": "assistant", "content": null}]), true),
        (json!([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]), true),
        (json!([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": bad_url}}]}]), false),
        (json!([{"role": "user"}]), false),
        (json!([{"role": "user", "content": null}]), false),
        (json!([{"role": "tool", "content": "x"}]), false),
        (json!([{"role": "function", "content": "x"}]), false),
        (json!([{"content": "x"}]), false),
        (json!([]), false),
        (json!("hi"), false),
        (part(json!({"type": "text", "text": "x"})), true),
        (part(json!({"type": "text"})), false),
        (part(json!({"type": "text", "text": 5})), false),
        (part(json!({"type": "input_audio", "input_audio": {}})), false),
        (part(json!({"text": "x"})), false),
        (part(json!({"type": "image_url", "image_url": {"url": bad_url}})), true),
        (part(json!({"type": "image_url", "image_url": {"url": bad_url, "detail": "high"}})), true),
        (part(json!({"type": "image_url", "image_url": bad_url})), true),
        (part(json!({"type": "image_url", "image_url": {}})), false),
        (part(json!({"type": "image_url", "image_url": {"url": 5}})), false),
        (part(json!({"type": "image_url"})), false),
        (part(json!({"type": "video_url", "video_url": {"url": bad_url}})), true),
        (part(json!({"type": "video_url", "video_url": {"url": [bad_url, bad_url]}})), true),
        (part(json!({"type": "video_url", "video_url": [bad_url]})), true),
        (part(json!({"type": "video_url", "video_url": bad_url})), true),
        (part(json!({"type": "video_url", "video_url": {"url": []}})), false),
        (part(json!({"type": "video_url", "video_url": {"url": [5]}})), false),
        (part(json!({"type": "video_url", "video_url": {}})), false),
    ];
    let images: Vec<(Value, bool)> = vec![
        (json!([bad_url]), true),
        (json!([{"url": bad_url}]), true),
        (json!([{"url": bad_url, "detail": "low"}]), true),
        (json!([5]), false),
        (json!([{}]), false),
        (json!(bad_url), false),
    ];
    let accepted = |r: &Reply| {
        let m = r.json["error"]["message"].as_str().unwrap_or("");
        r.status == 200 || (r.status == 400 && (m.contains("cannot read the media") || m.contains("cannot take video")))
    };
    for (msgs, expected) in messages {
        let body = json!({"messages": msgs, "max_tokens": 1});
        let spec_ok = c.spec.is_valid(&chat_schema, &body);
        let r = c.post(b, CHAT, body.clone()).await;
        let server_ok = accepted(&r);
        if spec_ok != expected || spec_ok != server_ok {
            c.fail(format!(
                "chat messages {msgs}: spec {}, probe table {}, server {} ({})",
                valid_str(spec_ok),
                valid_str(expected),
                valid_str(server_ok),
                r.json
            ));
        }
    }
    for (imgs, expected) in images {
        let body = json!({"prompt": "<image>", "images": imgs, "max_tokens": 1});
        let spec_ok = c.spec.is_valid(&completion_schema, &body);
        let r = c.post(b, COMPLETIONS, body.clone()).await;
        let server_ok = accepted(&r);
        if spec_ok != expected || spec_ok != server_ok {
            c.fail(format!(
                "completion images {imgs}: spec {}, probe table {}, server {} ({})",
                valid_str(spec_ok),
                valid_str(expected),
                valid_str(server_ok),
                r.json
            ));
        }
    }
}

// ------------------------------------------------------------------------------------------
// Demonstration sets and scoring
// ------------------------------------------------------------------------------------------

fn image_part(url: String) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

/// A captioning example in OpenFlamingo's format, as chat messages.
fn chat_example(image: &str, answer: &str) -> Value {
    json!({"messages": [
        {"role": "user", "content": [image_part(data_url(image)), {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": answer},
    ]})
}

/// The same example as a raw prompt with its image.
fn raw_example(image: &str, answer: &str) -> Value {
    json!({"prompt": format!("<image>Output: {answer}<|endofchunk|>"), "images": [data_url(image)]})
}

/// The query of the few-shot requests: an image to caption.
fn query_messages(image: &str) -> Value {
    json!([{"role": "user", "content": [image_part(data_url(image)), {"type": "text", "text": "Output:"}]}])
}

/// The messages of chat `examples`, in order, then `query`: what a set is the same as.
fn inline_messages(examples: &[&Value], query: &Value) -> Value {
    let mut out: Vec<Value> = examples.iter().flat_map(|e| e["messages"].as_array().unwrap().clone()).collect();
    out.extend(query.as_array().unwrap().iter().cloned());
    Value::Array(out)
}

/// The prompts of raw `examples` concatenated, then `prompt`; and their images, then `images`.
fn inline_prompt(examples: &[&Value], prompt: &str, images: &[Value]) -> (String, Vec<Value>) {
    let text = examples.iter().map(|e| e["prompt"].as_str().unwrap()).collect::<String>() + prompt;
    let mut all: Vec<Value> = examples.iter().flat_map(|e| e["images"].as_array().unwrap().clone()).collect();
    all.extend(images.iter().cloned());
    (text, all)
}

async fn get_set(c: &Checker, b: &str, id: &str) -> Reply {
    c.send(b, Method::GET, Some(DEMO), &format!("{DEMOS}/{id}"), Body::None, &[]).await
}

async fn delete_set(c: &Checker, b: &str, id: &str) -> Reply {
    c.send(b, Method::DELETE, Some(DEMO), &format!("{DEMOS}/{id}"), Body::None, &[]).await
}

/// Whether two generations have the same prompt length and the same answers, token for token.
fn same_answer(a: &Reply, b: &Reply) -> bool {
    let ids = |r: &Reply| r.json["choices"].as_array().map(|a| a.iter().map(|c| c["token_ids"].clone()).collect::<Vec<_>>());
    let given = ids(a).is_some_and(|v| v.iter().all(Value::is_array));
    given && a.json["usage"]["prompt_tokens"] == b.json["usage"]["prompt_tokens"] && ids(a) == ids(b)
}

fn assert_same_answer(inline: &Reply, with_set: &Reply, what: &str) {
    assert!(
        same_answer(inline, with_set),
        "{what}: a request naming a set is served as if its examples were inline\n  inline: {}\n  with the set: {}",
        inline.json,
        with_set.json
    );
}

/// The documented relations of a score response: one entry per candidate in order, `logprob`
/// the sum and `normalized_logprob` the mean of `token_logprobs`, `ranking` best first by
/// `rank_by`, no completion tokens.
fn check_scores(r: &Reply, candidates: &Value, rank_by: &str, top: usize) {
    assert_eq!(r.status, 200, "{}", r.json);
    let data = r.json["data"].as_array().unwrap();
    let cands = candidates.as_array().unwrap();
    assert_eq!(data.len(), cands.len());
    for (i, (d, cand)) in data.iter().zip(cands).enumerate() {
        assert_eq!((d["index"].as_u64(), &d["candidate"]), (Some(i as u64), cand));
        let lps: Vec<f64> = d["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(d["tokens"].as_array().unwrap().len(), lps.len());
        assert_eq!(d["token_ids"].as_array().unwrap().len(), lps.len());
        let sum: f64 = lps.iter().sum();
        assert!((d["logprob"].as_f64().unwrap() - sum).abs() < 1e-3, "logprob is the sum: {d}");
        assert!((d["normalized_logprob"].as_f64().unwrap() - sum / lps.len() as f64).abs() < 1e-3, "normalized_logprob is the mean: {d}");
        match top {
            0 => assert!(d.get("top_logprobs").is_none(), "top_logprobs only when asked: {d}"),
            k => {
                let tops = d["top_logprobs"].as_array().unwrap();
                assert_eq!(tops.len(), lps.len());
                assert!(tops.iter().all(|t| (1..=k).contains(&t.as_object().unwrap().len())), "{d}");
            }
        }
    }
    let ranking: Vec<usize> = r.json["ranking"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let mut sorted = ranking.clone();
    sorted.sort();
    assert_eq!(sorted, (0..data.len()).collect::<Vec<_>>(), "ranking is a permutation of the candidates");
    let key = |i: usize| data[i][rank_by].as_f64().unwrap();
    assert!(
        ranking.windows(2).all(|w| key(w[0]) > key(w[1]) || (key(w[0]) == key(w[1]) && w[0] < w[1])),
        "ranked by {rank_by}: {}",
        r.json
    );
    let u = &r.json["usage"];
    assert_eq!((u["completion_tokens"].as_u64(), u["total_tokens"].clone()), (Some(0), u["prompt_tokens"].clone()));
}

/// Whether two score responses score the same tokens with the same log-probabilities.
fn assert_same_scores(inline: &Reply, with_set: &Reply, what: &str) {
    let (a, b) = (&inline.json, &with_set.json);
    let close =
        a["data"].as_array().unwrap().iter().zip(b["data"].as_array().unwrap()).all(|(x, y)| {
            x["token_ids"] == y["token_ids"] && (x["logprob"].as_f64().unwrap() - y["logprob"].as_f64().unwrap()).abs() < 1e-3
        });
    assert!(
        close && a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"] && a["ranking"] == b["ranking"],
        "{what}: scoring with a set is scoring with its examples inline\n  inline: {a}\n  with the set: {b}"
    );
}

/// Registers, lists, describes, uses and deletes demonstration sets; scores candidates with and
/// without them. Returns the card of a chat set left registered (and stored) for the replicas.
async fn check_demonstrations(c: &Checker, b: &str) -> Value {
    let small = data_url("small.png");

    // ---- registration: 201, then 200 for the same content
    let examples = [
        chat_example("small.png", "a small picture."),
        chat_example("chelsea.png", "two cats."),
        chat_example("coffee.jpg", "a cup of coffee."),
    ];
    let chat_body = json!({"name": "captions", "examples": examples});
    let r = c.expect(b, DEMOS, chat_body.clone(), 201).await;
    let chat_set = r.json.clone();
    let chat_id = chat_set["id"].as_str().unwrap().to_string();
    assert_eq!(
        (&chat_set["kind"], &chat_set["examples"], &chat_set["images"], &chat_set["name"]),
        (&json!("chat"), &json!(3), &json!(3), &json!("captions"))
    );
    assert!(chat_set["prompt_tokens"].as_u64().unwrap() > 0, "the set's prefix is pinned: {chat_set}");
    assert!(storage_dir().join("demonstrations").join(format!("{chat_id}.json")).is_file(), "stored under storage.dir");
    let again = c.expect(b, DEMOS, chat_body.clone(), 200).await;
    assert_eq!(again.json, chat_set, "the same content again: the card of the set registered before");
    // The id is derived from the content, the name included.
    let renamed_body = merge(&chat_body, &json!({"name": "captions, again"}));
    let renamed = c.expect(b, DEMOS, renamed_body.clone(), 201).await;
    let renamed_id = renamed.json["id"].as_str().unwrap().to_string();
    assert_ne!(renamed_id, chat_id);

    let mut raw_examples = [raw_example("small.png", "a small picture."), raw_example("chelsea.png", "two cats.")];
    raw_examples[1]["images"] = json!([{"url": data_url("chelsea.png")}]);
    let r = c.expect(b, DEMOS, json!({"examples": raw_examples}), 201).await;
    let raw_id = r.json["id"].as_str().unwrap().to_string();
    assert_eq!(
        (&r.json["kind"], &r.json["examples"], &r.json["images"], &r.json["name"]),
        (&json!("raw"), &json!(2), &json!(2), &json!(""))
    );

    // ---- listed, and described one by one
    let list = c.get(b, DEMOS, DEMOS).await;
    assert_eq!(list.status, 200);
    let listed = list.json["data"].as_array().unwrap().clone();
    for id in [&chat_id, &renamed_id, &raw_id] {
        let entry = listed.iter().find(|s| s["id"] == id.as_str()).unwrap_or_else(|| panic!("{id} is listed: {}", list.json));
        let r = get_set(c, b, id).await;
        assert_eq!((r.status, &r.json), (200, entry));
    }

    // ---- chat completions with a chat set: the same as its examples sent inline
    let query = query_messages("small.png");
    let gen = json!({"max_tokens": 6, "return_token_ids": true});
    let all: Vec<&Value> = examples.iter().collect();
    let inline = c.expect(b, CHAT, merge(&gen, &json!({"messages": inline_messages(&all, &query)})), 200).await;
    let with_set = c.expect(b, CHAT, merge(&gen, &json!({"messages": query, "demonstrations": {"id": chat_id}})), 200).await;
    assert_same_answer(&inline, &with_set, "chat, the whole set");
    assert!(with_set.json["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "the pinned prefix is reused");
    // RICES: k = 1 takes the most similar example (the one with the query's own image).
    let k1 = c.expect(b, CHAT, merge(&gen, &json!({"messages": query, "demonstrations": {"id": chat_id, "k": 1}})), 200).await;
    let inline1 = c.expect(b, CHAT, merge(&gen, &json!({"messages": inline_messages(&[&examples[0]], &query)})), 200).await;
    assert_same_answer(&inline1, &k1, "chat, k = 1");
    // k = 2: the two most similar, the most similar last.
    let k2 = c.expect(b, CHAT, merge(&gen, &json!({"messages": query, "demonstrations": {"id": chat_id, "k": 2}})), 200).await;
    let mut matched = false;
    for other in [&examples[1], &examples[2]] {
        let r = c.expect(b, CHAT, merge(&gen, &json!({"messages": inline_messages(&[other, &examples[0]], &query)})), 200).await;
        matched |= same_answer(&r, &k2);
    }
    assert!(matched, "chat, k = 2: another example, then the most similar: {}", k2.json);
    // Streamed.
    let s = c
        .expect(
            b,
            CHAT,
            json!({"messages": query, "demonstrations": {"id": chat_id, "k": 2}, "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}),
            200,
        )
        .await;
    assert_eq!(s.chunks.last().unwrap()["usage"]["prompt_tokens"], k2.json["usage"]["prompt_tokens"]);

    // ---- completions with a raw set
    let raw_refs: Vec<&Value> = raw_examples.iter().collect();
    let raw_query = json!({"prompt": "<image>Output:", "images": [small], "max_tokens": 6, "return_token_ids": true});
    let (text, images) = inline_prompt(&raw_refs, "<image>Output:", &[json!(small)]);
    let inline = c.expect(b, COMPLETIONS, merge(&raw_query, &json!({"prompt": text, "images": images})), 200).await;
    let with_set = c.expect(b, COMPLETIONS, merge(&raw_query, &json!({"demonstrations": {"id": raw_id}})), 200).await;
    assert_same_answer(&inline, &with_set, "completions, the whole set");
    let (text, images) = inline_prompt(&raw_refs[..1], "<image>Output:", &[json!(small)]);
    let inline1 = c.expect(b, COMPLETIONS, merge(&raw_query, &json!({"prompt": text, "images": images})), 200).await;
    let k1 = c.expect(b, COMPLETIONS, merge(&raw_query, &json!({"demonstrations": {"id": raw_id, "k": 1}})), 200).await;
    assert_same_answer(&inline1, &k1, "completions, k = 1");

    // ---- generation errors with sets
    let chat_schema = c.spec.request_schema(CHAT);
    for (path, body) in [
        (CHAT, json!({"messages": query, "demonstrations": {"id": NO_SET}})),
        (CHAT, json!({"messages": query, "demonstrations": {"id": "not-a-set-id"}})),
        (COMPLETIONS, json!({"prompt": "<image>Output:", "images": [small], "demonstrations": {"id": NO_SET}})),
    ] {
        let r = c.expect(b, path, body, 404).await;
        assert_eq!(r.json["error"]["param"], "demonstrations.id");
    }
    for (path, body, param) in [
        (CHAT, json!({"messages": query, "demonstrations": {"id": raw_id}}), "demonstrations.id"),
        (COMPLETIONS, json!({"prompt": "<image>Output:", "images": [small], "demonstrations": {"id": chat_id}}), "demonstrations.id"),
        (CHAT, json!({"messages": query, "demonstrations": {"id": chat_id, "k": 0}}), "demonstrations.k"),
        (CHAT, json!({"messages": query, "demonstrations": {"id": chat_id, "k": 4}}), "demonstrations.k"),
        (CHAT, json!({"messages": user("A photo of"), "demonstrations": {"id": chat_id, "k": 1}}), "demonstrations.k"),
        (COMPLETIONS, json!({"prompt": "Output:", "demonstrations": {"id": raw_id, "k": 1}}), "demonstrations.k"),
    ] {
        let r = c.expect(b, path, body.clone(), 400).await;
        assert_eq!(r.json["error"]["param"], param, "{body:.200}");
    }
    assert!(!c.spec.is_valid(&chat_schema, &json!({"messages": query, "demonstrations": {"id": chat_id, "k": 0}})), "k = 0 is invalid");

    // ---- scoring
    let cands = json!([" a small picture.", " two cats.", " a cup of coffee."]);
    let raw = json!({"prompt": "<image>Output:", "images": [small], "candidates": cands});
    let plain = c.expect(b, SCORE, raw.clone(), 200).await;
    check_scores(&plain, &cands, "logprob", 0);
    let by_mean = c.expect(b, SCORE, merge(&raw, &json!({"model": MODEL, "rank_by": "normalized_logprob", "top_logprobs": 2})), 200).await;
    check_scores(&by_mean, &cands, "normalized_logprob", 2);
    for (x, y) in plain.json["data"].as_array().unwrap().iter().zip(by_mean.json["data"].as_array().unwrap()) {
        assert_eq!(x["token_ids"], y["token_ids"], "rank_by and top_logprobs change no score");
    }
    // Raw form with a raw set: the same as its prompts inline.
    let (text, images) = inline_prompt(&raw_refs, "<image>Output:", &[json!(small)]);
    let inline = c.expect(b, SCORE, json!({"prompt": text, "images": images, "candidates": cands}), 200).await;
    let with_set = c.expect(b, SCORE, merge(&raw, &json!({"demonstrations": {"id": raw_id}})), 200).await;
    check_scores(&with_set, &cands, "logprob", 0);
    assert_same_scores(&inline, &with_set, "raw scoring, the whole set");
    c.expect(b, SCORE, merge(&raw, &json!({"demonstrations": {"id": raw_id, "k": 1}})), 200).await;
    // Chat form: each candidate as the assistant's reply; include_end scores its end too.
    let answers = json!(["a small picture.", "two cats."]);
    let chat = json!({"messages": query, "candidates": answers});
    let open = c.expect(b, SCORE, chat.clone(), 200).await;
    check_scores(&open, &answers, "logprob", 0);
    let ended = c.expect(b, SCORE, merge(&chat, &json!({"include_end": true})), 200).await;
    check_scores(&ended, &answers, "logprob", 0);
    for (x, y) in open.json["data"].as_array().unwrap().iter().zip(ended.json["data"].as_array().unwrap()) {
        assert_eq!(x["tokens"].as_array().unwrap().len() + 1, y["tokens"].as_array().unwrap().len(), "include_end adds the end token");
    }
    // Chat form with a chat set: the same as its messages inline.
    let inline = c.expect(b, SCORE, merge(&chat, &json!({"messages": inline_messages(&all, &query)})), 200).await;
    let with_set = c.expect(b, SCORE, merge(&chat, &json!({"demonstrations": {"id": chat_id}})), 200).await;
    assert_same_scores(&inline, &with_set, "chat scoring, the whole set");
    let k1 = c.expect(b, SCORE, merge(&chat, &json!({"demonstrations": {"id": chat_id, "k": 1}})), 200).await;
    let inline1 = c.expect(b, SCORE, merge(&chat, &json!({"messages": inline_messages(&[&examples[0]], &query)})), 200).await;
    assert_same_scores(&inline1, &k1, "chat scoring, k = 1");
    // Errors.
    let r = c.send(b, Method::POST, Some(SCORE), SCORE, Body::Raw("application/json", b"{\"prompt\": ".to_vec()), &[]).await;
    assert_eq!(r.status, 400);
    let r = c.expect(b, SCORE, merge(&raw, &json!({"model": "gpt-4o"})), 404).await;
    assert_eq!(r.json["error"]["param"], "model");
    let r = c.expect(b, SCORE, merge(&raw, &json!({"demonstrations": {"id": NO_SET}})), 404).await;
    assert_eq!(r.json["error"]["param"], "demonstrations.id");
    for (body, param) in [
        (merge(&raw, &json!({"demonstrations": {"id": chat_id}})), json!("demonstrations.id")),
        (json!({"prompt": "<image>Output:", "candidates": cands}), json!("images")),
        (json!({"prompt": "A photo of", "candidates": []}), json!("candidates")),
        (json!({"prompt": "A photo of"}), json!(null)),
        (json!({"candidates": cands}), json!(null)),
        (merge(&chat, &json!({"prompt": "A photo of"})), json!(null)),
    ] {
        let r = c.expect(b, SCORE, body.clone(), 400).await;
        assert_eq!(r.json["error"]["param"], param, "{body:.200}");
    }
    check_score_probes(c, b).await;

    // ---- registration errors, and the spec and the server agree on what is valid
    let r = c.send(b, Method::POST, Some(DEMOS), DEMOS, Body::Raw("application/json", b"{\"examples\": [".to_vec()), &[]).await;
    assert_eq!(r.status, 400);
    let text_example = json!({"prompt": "A photo of a cat.<|endofchunk|>"});
    for (body, param) in [
        (json!({"examples": vec![text_example.clone(); 65]}), "examples"),
        (json!({"examples": [examples[0], raw_examples[0]]}), "examples[1]"),
        (json!({"examples": [raw_examples[0], examples[0]]}), "examples[1]"),
        (json!({"examples": [{"prompt": "<image>Output:"}]}), "examples[0].images"),
        (json!({"examples": [{"prompt": "<image>Output:", "images": ["data:image/png;base64,AAAA"]}]}), "examples[0].images[0]"),
        (json!({"examples": [{"prompt": "<image>Output:", "images": [format!("blob:{}", "0".repeat(64))]}]}), "examples[0].images[0]"),
    ] {
        let r = c.expect(b, DEMOS, body, 400).await;
        assert_eq!(r.json["error"]["param"], param, "{}", r.json);
    }
    let schema = c.spec.request_schema(DEMOS);
    let registrations: Vec<(Value, bool)> = vec![
        (json!({"examples": [text_example]}), true),
        (json!({"name": "text", "examples": [text_example]}), true),
        (json!({"name": null, "examples": [text_example, {"prompt": "A dog.<|endofchunk|>", "images": []}]}), true),
        (
            json!({"examples": [{"prompt": "<image>Output: a small picture.<|endofchunk|>", "images": [{"url": small, "detail": "low"}]}]}),
            true,
        ),
        (json!({"examples": [{"messages": user("A photo of a cat.")}]}), true),
        (json!({"examples": [{"messages": [{"role": "user", "content": "A cat."}, {"role": "assistant"}]}]}), true),
        (json!({"examples": vec![text_example.clone(); 64]}), true),
        (json!({}), false),
        (json!({"examples": []}), false),
        (json!({"examples": null}), false),
        (json!({"examples": [text_example], "extra": 1}), false),
        (json!({"name": 5, "examples": [text_example]}), false),
        (json!({"examples": ["A photo of a cat."]}), false),
        (json!({"examples": [{}]}), false),
        (json!({"examples": [{"prompt": 5}]}), false),
        (json!({"examples": [{"prompt": "A cat.", "extra": 1}]}), false),
        (json!({"examples": [{"prompt": "A cat.", "images": null}]}), false),
        (json!({"examples": [{"prompt": "<image>A cat.", "images": [5]}]}), false),
        (json!({"examples": [{"messages": []}]}), false),
        (json!({"examples": [{"messages": "A cat."}]}), false),
        (json!({"examples": [{"messages": user("A cat."), "extra": 1}]}), false),
        (json!({"examples": [{"messages": [{"role": "tool", "content": "x"}]}]}), false),
        (json!({"examples": [{"messages": user("A cat.")}, text_example]}), false),
    ];
    for (body, expected) in registrations {
        let spec_ok = c.spec.is_valid(&schema, &body);
        let r = c.post(b, DEMOS, body.clone()).await;
        let server_ok = matches!(r.status, 200 | 201);
        if spec_ok != expected || spec_ok != server_ok || !(server_ok || r.status == 400) {
            c.fail(format!(
                "POST {DEMOS} {body:.200}: spec {}, probe table {}, server {} {}",
                valid_str(spec_ok),
                valid_str(expected),
                r.status,
                r.json
            ));
        }
    }

    // ---- deletion
    let r = delete_set(c, b, &renamed_id).await;
    assert_eq!((r.status, &r.json), (200, &json!({"id": renamed_id, "object": "demonstration_set.deleted", "deleted": true})));
    for id in [renamed_id.as_str(), NO_SET, "not-a-set-id"] {
        for r in [get_set(c, b, id).await, delete_set(c, b, id).await] {
            assert_eq!((r.status, &r.json["error"]["param"]), (404, &json!("id")), "{id}: {}", r.json);
        }
    }
    let r = c.expect(b, CHAT, merge(&gen, &json!({"messages": query, "demonstrations": {"id": renamed_id}})), 404).await;
    assert_eq!(r.json["error"]["param"], "demonstrations.id");
    // Registered again: the same id.
    let r = c.expect(b, DEMOS, renamed_body, 201).await;
    assert_eq!(r.json["id"], renamed_id.as_str());

    // ---- a set that cannot be stored: 507, nothing registered
    let sets_dir = storage_dir().join("demonstrations");
    let aside = storage_dir().join("demonstrations.aside");
    std::fs::rename(&sets_dir, &aside).unwrap();
    std::fs::write(&sets_dir, b"not a directory").unwrap();
    let unstorable = json!({"name": "unstorable", "examples": [text_example]});
    let r = c.expect(b, DEMOS, unstorable.clone(), 507).await;
    std::fs::remove_file(&sets_dir).unwrap();
    std::fs::rename(&aside, &sets_dir).unwrap();
    assert_eq!(r.json["error"]["type"], "server_error");
    let list = c.get(b, DEMOS, DEMOS).await;
    assert!(list.json["data"].as_array().unwrap().iter().all(|s| s["name"] != "unstorable"), "nothing was registered");
    assert!(list.json["data"].as_array().unwrap().contains(&chat_set));

    chat_set
}

/// `/v1/score` fields: the spec and the server agree. Probes are sent with an empty `prompt`,
/// rejected (param `prompt`) only after every field was checked.
async fn check_score_probes(c: &Checker, b: &str) {
    let probes: Vec<(Value, bool)> = vec![
        (json!({"candidates": vec!["a"; 64]}), true),
        (json!({"candidates": vec!["a"; 65]}), false),
        (json!({"candidates": []}), false),
        (json!({"candidates": [""]}), false),
        (json!({"candidates": ["a", 5]}), false),
        (json!({"candidates": "a"}), false),
        (json!({"candidates": null}), false),
        (json!({"top_logprobs": 0}), true),
        (json!({"top_logprobs": 20}), true),
        (json!({"top_logprobs": 21}), false),
        (json!({"top_logprobs": -1}), false),
        (json!({"top_logprobs": 1.5}), false),
        (json!({"top_logprobs": null}), true),
        (json!({"rank_by": "logprob"}), true),
        (json!({"rank_by": "normalized_logprob"}), true),
        (json!({"rank_by": "mean"}), false),
        (json!({"rank_by": 1}), false),
        (json!({"rank_by": null}), true),
        (json!({"include_end": true}), true),
        (json!({"include_end": "yes"}), false),
        (json!({"include_end": null}), true),
        (json!({"model": MODEL}), true),
        (json!({"model": null}), true),
        (json!({"model": 5}), false),
        (json!({"images": []}), true),
        (json!({"images": ["ftp://example.invalid/a.png", {"url": "ftp://example.invalid/a.png"}]}), true),
        (json!({"images": [5]}), false),
        (json!({"images": [{}]}), false),
        (json!({"images": null}), false),
        (json!({"demonstrations": {"id": NO_SET}}), true),
        (json!({"demonstrations": {"id": NO_SET, "k": 3}}), true),
        (json!({"demonstrations": null}), true),
        (json!({"demonstrations": {"id": 5}}), false),
        (json!({"demonstrations": {"k": 1}}), false),
        (json!({"demonstrations": {"id": NO_SET, "k": -1}}), false),
        (json!({"demonstrations": {"id": NO_SET, "top": 1}}), false),
        (json!({"messages": user("x")}), false),
        (json!({"messages": null}), true),
        (json!({"temperature": 0}), false),
        (json!({"max_tokens": 1}), false),
    ];
    let schema = c.spec.request_schema(SCORE);
    let valid = json!({"prompt": "x", "candidates": ["a"]});
    let sent = json!({"prompt": "", "candidates": ["a"]});
    for (fields, expected) in probes {
        let spec_ok = c.spec.is_valid(&schema, &merge(&valid, &fields));
        let r = c.expect(b, SCORE, merge(&sent, &fields), 400).await;
        let server_ok = r.json["error"]["param"] == "prompt";
        if spec_ok != expected || spec_ok != server_ok {
            c.fail(format!(
                "{SCORE} {fields}: spec {}, probe table {}, server {} ({})",
                valid_str(spec_ok),
                valid_str(expected),
                valid_str(server_ok),
                r.json["error"]["message"]
            ));
        }
    }
    // The two forms: exactly one of `messages` and `prompt`.
    for (body, expected) in [
        (json!({"messages": user("x"), "candidates": ["a"]}), true),
        (json!({"messages": user("x"), "prompt": null, "candidates": ["a"]}), true),
        (json!({"prompt": "x", "messages": null, "candidates": ["a"]}), true),
        (json!({"messages": [], "candidates": ["a"]}), false),
        (json!({"prompt": null, "messages": null, "candidates": ["a"]}), false),
    ] {
        let spec_ok = c.spec.is_valid(&schema, &body);
        let r = c.post(b, SCORE, body.clone()).await;
        if spec_ok != expected || spec_ok != (r.status == 200) {
            c.fail(format!(
                "{SCORE} {body}: spec {}, probe table {}, server {} {}",
                valid_str(spec_ok),
                valid_str(expected),
                r.status,
                r.json
            ));
        }
    }
}

/// Two characters from the middle of the greedy answer to "A photo of" (a stop string that fires).
async fn stop_string(c: &Checker, b: &str) -> String {
    let r = c.expect(b, CHAT, json!({"messages": user("A photo of"), "max_tokens": 16}), 200).await;
    let chars: Vec<char> = r.json["choices"][0]["message"]["content"].as_str().unwrap().chars().collect();
    assert!(chars.len() >= 6, "the tiny model's answer is long enough to cut: {chars:?}");
    chars[3..5].iter().collect()
}

fn valid_str(ok: bool) -> &'static str {
    if ok {
        "valid"
    } else {
        "invalid"
    }
}
