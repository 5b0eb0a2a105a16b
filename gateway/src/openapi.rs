//! `/openapi.json`: the served API described as OpenAPI 3.0.

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

fn error_responses() -> Value {
    let e = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({"400": e, "401": e, "404": e, "409": e, "429": e})
}

fn op(summary: &str, params: Value, body: Option<Value>, ok: Value) -> Value {
    let mut responses = error_responses();
    responses["200"] = ok;
    let mut o = json!({"summary": summary, "parameters": params, "responses": responses});
    if let Some(b) = body {
        o["requestBody"] = b;
    }
    o
}

fn json_ok(schema: &str) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn path_id(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The document.
pub fn document() -> Value {
    let create_video = json!({"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 32000},
        "model": {"type": "string"}, "seconds": {"type": "string"}, "size": {"type": "string"},
        "negative_prompt": {"type": "string"}, "seed": {"type": "integer", "minimum": 0},
        "num_inference_steps": {"type": "integer", "minimum": 1}, "guidance_scale": {"type": "number"},
        "shift": {"type": "number"}, "fps": {"type": "integer", "minimum": 1}, "num_frames": {"type": "integer", "minimum": 1},
        "encoder_engine_rank": {"type": "integer", "minimum": 0}, "dit_engine_rank": {"type": "integer", "minimum": 0},
        "decoder_engine_rank": {"type": "integer", "minimum": 0},
        "input_reference": {"type": "string", "format": "binary"}}});
    let image_gen = json!({"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 32000},
        "model": {"type": "string", "nullable": true}, "n": {"type": "integer", "nullable": true, "minimum": 1},
        "size": {"type": "string", "nullable": true},
        "response_format": {"type": "string", "nullable": true, "enum": ["b64_json", "url"]},
        "output_format": {"type": "string", "nullable": true, "enum": ["png", "jpeg", "webp"]},
        "output_compression": {"type": "integer", "nullable": true, "minimum": 0, "maximum": 100},
        "stream": {"type": "boolean", "nullable": true}, "partial_images": {"type": "integer", "nullable": true},
        "seed": {"type": "integer", "minimum": 0}, "num_inference_steps": {"type": "integer", "minimum": 1}}});
    let image_edit = json!({"type": "object", "required": ["prompt", "image"], "properties": {
        "prompt": {"type": "string"}, "model": {"type": "string"}, "n": {"type": "string"},
        "image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"}}});
    let body = |schema: Value, multipart: bool| {
        let mut content = json!({"application/json": {"schema": schema}});
        if multipart {
            content["multipart/form-data"] = json!({"schema": schema});
        }
        json!({"required": true, "content": content})
    };
    let id = json!([path_id("video_id")]);
    json!({
        "openapi": "3.0.3",
        "info": {"title": "x2v gateway", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/videos": {
                "post": op("Create a video job", json!([]), Some(body(create_video, true)), json_ok("Video")),
                "get": op("List videos", json!([
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 100}},
                    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}}]), None, json_ok("VideoList")),
            },
            "/v1/videos/{video_id}": {
                "get": op("Retrieve a video", id.clone(), None, json_ok("Video")),
                "delete": op("Delete a video (cancels its work)", id.clone(), None, json_ok("VideoDeleted")),
            },
            "/v1/videos/{video_id}/content": {"get": op("Download video content", json!([path_id("video_id"),
                {"name": "variant", "in": "query", "schema": {"type": "string", "enum": ["video", "thumbnail", "spritesheet"]}}]),
                None, json!({"description": "Media bytes", "content": {"application/octet-stream": {}}}))},
            "/v1/videos/{video_id}/remix": {"post": op("Remix a video", id.clone(), Some(body(json!({"type": "object", "required": ["prompt"],
                "properties": {"prompt": {"type": "string", "minLength": 1}}}), false)), json_ok("Video"))},
            "/v1/videos/{video_id}/events": {"get": op("Status and progress events (SSE)", id, None,
                json!({"description": "Event stream", "content": {"text/event-stream": {}}}))},
            "/v1/images/generations": {"post": op("Generate images", json!([]), Some(body(image_gen, false)), json_ok("ImagesResponse"))},
            "/v1/images/edits": {"post": op("Edit images", json!([]), Some(json!({"required": true,
                "content": {"multipart/form-data": {"schema": image_edit}}})), json_ok("ImagesResponse"))},
            "/v1/models": {"get": op("Models served by live workers", json!([]), None, json_ok("ModelList"))},
            "/healthz": {"get": {"responses": {"200": {"description": "Alive"}}}},
            "/readyz": {"get": {"responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["message", "type", "param", "code"], "properties": {
                        "message": {"type": "string"}, "type": {"type": "string"},
                        "param": {"type": "string", "nullable": true}, "code": {"type": "string", "nullable": true}}}}},
                "Video": {"type": "object", "required": ["id", "object", "model", "status", "progress", "created_at", "size", "seconds"],
                    "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "model": {"type": "string"},
                        "status": {"type": "string", "enum": ["queued", "in_progress", "completed", "failed"]},
                        "progress": {"type": "integer"}, "created_at": {"type": "integer"},
                        "completed_at": {"type": "integer", "nullable": true}, "expires_at": {"type": "integer", "nullable": true},
                        "prompt": {"type": "string", "nullable": true}, "size": {"type": "string"}, "seconds": {"type": "string"},
                        "remixed_from_video_id": {"type": "string", "nullable": true},
                        "error": {"type": "object", "nullable": true}}},
                "VideoList": {"type": "object", "required": ["object", "data", "has_more"], "properties": {
                    "object": {"type": "string"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Video"}},
                    "first_id": {"type": "string", "nullable": true}, "last_id": {"type": "string", "nullable": true},
                    "has_more": {"type": "boolean"}}},
                "VideoDeleted": {"type": "object", "required": ["id", "object", "deleted"], "properties": {
                    "id": {"type": "string"}, "object": {"type": "string"}, "deleted": {"type": "boolean"}}},
                "ImagesResponse": {"type": "object", "required": ["created", "data"], "properties": {
                    "created": {"type": "integer"}, "data": {"type": "array", "items": {"type": "object"}}}},
                "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object"}}}},
            },
        },
        "security": [{"bearer": []}],
    })
}

pub async fn serve() -> Response {
    axum::Json(document()).into_response()
}
