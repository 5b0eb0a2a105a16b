//! The generated `/openapi.json`: every served path documented, the error envelope on the error
//! answers, bearer security, multipart bodies where multipart is read, and the same bounds that
//! validation enforces.

mod common;

use serde_json::{Value, json};
use x2v_gateway::params::{
    GUIDANCE_SCALE, MAX_COMPRESSION, MAX_EDIT_IMAGES, MAX_ENGINE_RANK, MAX_FPS, MAX_PROMPT_CHARS,
    MAX_SEED, SHIFT,
};

use common::*;

fn document() -> Value {
    serde_json::to_value(x2v_gateway::openapi::document()).unwrap()
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "no schema {name}");
    s
}

/// The numeric bounds of a property, whatever its nullability.
fn bounds(property: &Value) -> (Option<f64>, Option<f64>) {
    (property["minimum"].as_f64(), property["maximum"].as_f64())
}

#[test]
fn every_served_path_is_documented_with_its_methods() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let expected = [
        ("/v1/videos", &["post", "get"][..]),
        ("/v1/videos/{video_id}", &["get", "delete"]),
        ("/v1/videos/{video_id}/content", &["get"]),
        ("/v1/videos/{video_id}/remix", &["post"]),
        ("/v1/videos/edits", &["post"]),
        ("/v1/videos/extensions", &["post"]),
        ("/v1/videos/{video_id}/events", &["get"]),
        ("/v1/images/generations", &["post"]),
        ("/v1/images/edits", &["post"]),
        ("/v1/images/{image_id}/content", &["get"]),
        ("/v1/models", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
    ];
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), expected.len(), "{:?}", paths.keys().collect::<Vec<_>>());
    let mut operation_ids = vec![];
    for (path, methods) in expected {
        for method in methods {
            let op = &paths[path][method];
            assert!(op.is_object(), "{method} {path} is not documented");
            operation_ids.push(op["operationId"].as_str().unwrap().to_owned());
        }
    }
    let count = operation_ids.len();
    operation_ids.sort();
    operation_ids.dedup();
    assert_eq!(operation_ids.len(), count, "operation ids must be unique");
}

#[test]
fn api_errors_carry_the_envelope_and_the_api_needs_a_bearer_key() {
    let doc = document();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer", "description": "An API key from the gateway's `auth.api_keys`."})
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    let error = schema(&doc, "Error");
    assert_eq!(error["required"], json!(["error"]));
    let object = schema(&doc, "ErrorObject");
    for field in ["message", "type", "param", "code"] {
        assert!(object["properties"][field].is_object(), "ErrorObject.{field}");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            if path == "/healthz" || path == "/readyz" {
                assert_eq!(op["security"], json!([{}]), "{path} is open");
                continue;
            }
            for status in ["400", "401", "404", "409", "413", "429", "503", "504"] {
                let content = &responses[status]["content"]["application/json"]["schema"];
                assert_eq!(
                    content["$ref"], "#/components/schemas/Error",
                    "{method} {path} answers {status} without the envelope"
                );
            }
            assert!(responses["429"]["headers"]["retry-after"].is_object(), "{method} {path}");
        }
    }
}

#[test]
fn bodies_are_json_or_multipart_as_read_and_flat() {
    let doc = document();
    let content = |path: &str| {
        let c = doc["paths"][path]["post"]["requestBody"]["content"].as_object().unwrap();
        c.keys().cloned().collect::<Vec<_>>()
    };
    let both = ["application/json", "multipart/form-data"];
    assert_eq!(content("/v1/videos"), both);
    assert_eq!(content("/v1/videos/{video_id}/remix"), both);
    assert_eq!(content("/v1/images/generations"), both);
    assert_eq!(content("/v1/images/edits"), ["multipart/form-data"]);

    // Sampling fields are flattened into each body: form encoders read top-level properties.
    for name in ["CreateVideoRequest", "CreateImageRequest", "EditImageRequest"] {
        let s = schema(&doc, name);
        assert_eq!(s["type"], "object", "{name}");
        assert!(s.get("allOf").is_none(), "{name}");
        for field in ["prompt", "seed", "num_inference_steps", "dit_engine_rank"] {
            assert!(s["properties"][field].is_object(), "{name}.{field}");
        }
        let required =
            if name == "EditImageRequest" { json!(["prompt", "image"]) } else { json!(["prompt"]) };
        assert_eq!(s["required"], required, "{name}");
    }
    let edit = schema(&doc, "EditImageRequest");
    let image = &edit["properties"]["image"];
    assert_eq!(image["items"]["format"], "binary");
    assert_eq!(
        (image["minItems"].as_u64(), image["maxItems"].as_u64()),
        (Some(1), Some(MAX_EDIT_IMAGES as u64))
    );
    assert!(edit["properties"]["mask"]["format"] == "binary");
    let video = schema(&doc, "CreateVideoRequest");
    assert_eq!(video["properties"]["input_reference"]["format"], "binary");
}

#[test]
fn documented_bounds_are_the_ones_validation_enforces() {
    let doc = document();
    let video = &schema(&doc, "CreateVideoRequest")["properties"];
    let image = &schema(&doc, "CreateImageRequest")["properties"];
    for body in [video, image] {
        assert_eq!(body["prompt"]["minLength"], 1);
        assert_eq!(body["prompt"]["maxLength"], MAX_PROMPT_CHARS);
        assert_eq!(body["negative_prompt"]["maxLength"], MAX_PROMPT_CHARS);
        assert_eq!(bounds(&body["seed"]), (Some(0.0), Some(MAX_SEED as f64)));
        assert_eq!(bounds(&body["num_inference_steps"]).0, Some(1.0));
        for scale in ["guidance_scale", "guidance_scale_2"] {
            assert_eq!(
                bounds(&body[scale]),
                (Some(GUIDANCE_SCALE.0), Some(GUIDANCE_SCALE.1)),
                "{scale}"
            );
        }
        assert_eq!(bounds(&body["shift"]), (Some(SHIFT.0), Some(SHIFT.1)));
        for rank in ["encoder_engine_rank", "dit_engine_rank", "decoder_engine_rank"] {
            assert_eq!(bounds(&body[rank]), (Some(0.0), Some(MAX_ENGINE_RANK as f64)), "{rank}");
        }
    }
    assert_eq!(bounds(&video["fps"]), (Some(1.0), Some(MAX_FPS as f64)));
    assert_eq!(bounds(&video["num_frames"]).0, Some(1.0));
    assert_eq!(bounds(&image["n"]).0, Some(1.0));
    assert_eq!(bounds(&image["output_compression"]), (Some(0.0), Some(MAX_COMPRESSION as f64)));
    assert_eq!(
        bounds(&image["partial_images"]),
        (Some(0.0), Some(f64::from(x2v_queue::MAX_PREVIEWS)))
    );
    let list = doc["paths"]["/v1/videos"]["get"]["parameters"].as_array().unwrap();
    let limit = list.iter().find(|p| p["name"] == "limit").unwrap();
    assert_eq!(bounds(&limit["schema"]), (Some(0.0), Some(100.0)));
    let order = list.iter().find(|p| p["name"] == "order").unwrap();
    assert_eq!(enum_values(&order["schema"]), ["asc", "desc"]);
    assert_eq!(enum_values(schema(&doc, "ResponseFormat")), ["b64_json", "url"]);
    assert_eq!(enum_values(schema(&doc, "OutputFormat")), ["png", "jpeg", "webp"]);
    assert_eq!(
        enum_values(schema(&doc, "VideoStatus")),
        ["queued", "in_progress", "completed", "failed"]
    );
}

/// The values of an enum schema, found through `oneOf` (nullable) wrappers.
fn enum_values(s: &Value) -> Vec<String> {
    if let Some(values) = s["enum"].as_array() {
        return values.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    }
    s["oneOf"].as_array().into_iter().flatten().flat_map(enum_values).collect()
}

#[test]
fn responses_name_their_schemas() {
    let doc = document();
    let body = |path: &str, method: &str| {
        doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
            ["$ref"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("#/components/schemas/")
            .to_owned()
    };
    assert_eq!(body("/v1/videos", "post"), "Video");
    assert_eq!(body("/v1/videos", "get"), "VideoList");
    assert_eq!(body("/v1/videos/{video_id}", "get"), "Video");
    assert_eq!(body("/v1/videos/{video_id}", "delete"), "VideoDeleted");
    assert_eq!(body("/v1/images/generations", "post"), "ImagesResponse");
    assert_eq!(body("/v1/models", "get"), "ModelList");
    let video = schema(&doc, "Video");
    for field in ["id", "object", "model", "status", "progress", "created_at", "size", "seconds"] {
        assert!(
            video["required"].as_array().unwrap().iter().any(|r| r == field),
            "Video.{field} is required"
        );
    }
}

#[tokio::test]
async fn the_served_document_is_the_generated_one() {
    let h = harness(config());
    let (status, served, _) = h.json(get("/openapi.json")).await;
    assert_eq!(status, 200);
    assert_eq!(served, document());
}

#[test]
fn snapshot() {
    // The crate version changes with every release; the document's content is what is pinned.
    let mut doc = x2v_gateway::openapi::document();
    doc.info.version = "[version]".into();
    insta::assert_json_snapshot!("openapi", doc);
}
