//! `/openapi.json`: the served API as OpenAPI 3.1, generated from the handlers' `#[utoipa::path]`
//! attributes and the derived schemas of the request and response types they read and write.
//! The router collects each handler's operation as it registers its route ([`crate::api`]), so
//! every documented path is served and every served API path is documented.

use std::collections::BTreeMap;

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::error::ErrorEnvelope;

/// The document's frame; the routes add their paths and schemas.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "x2v gateway",
        description = "OpenAI-compatible video and image generation over a durable job queue."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorEnvelope))
)]
pub struct ApiDoc;

/// The `bearer` scheme the API routes require (when the gateway has keys configured).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An API key from the gateway's `auth.api_keys`."))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The error answers any API route may give, each carrying the [`ErrorEnvelope`].
pub struct ErrorResponses;

/// Status and meaning of each error answer.
const ERRORS: [(u16, &str); 9] = [
    (
        400,
        "The request is invalid; the message names the field, what is allowed and what was given",
    ),
    (401, "No API key, or one the gateway does not know"),
    (404, "No such route, video or image"),
    (409, "The Idempotency-Key was used before for a different request"),
    (413, "The body is larger than the gateway accepts"),
    (415, "The body is neither JSON nor a multipart form"),
    (
        429,
        "A rate limit, or the server's or the model's queue is full; retry after `retry-after` seconds",
    ),
    (503, "The job store or output storage is unavailable"),
    (504, "The request did not finish within the gateway's deadline"),
];

impl IntoResponses for ErrorResponses {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let envelope = Ref::from_schema_name(ErrorEnvelope::name());
        ERRORS
            .iter()
            .map(|(status, description)| {
                let mut response = ResponseBuilder::new()
                    .description(*description)
                    .content("application/json", Content::new(Some(envelope.clone())));
                if *status == 429 {
                    let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1));
                    response = response.header(
                        "retry-after",
                        HeaderBuilder::new()
                            .schema(Some(seconds))
                            .description(Some("Seconds to wait before retrying"))
                            .build(),
                    );
                }
                (status.to_string(), RefOr::T(response.build()))
            })
            .collect()
    }
}

/// The whole document, as the router serves it.
pub fn document() -> utoipa::openapi::OpenApi {
    crate::api().document
}

/// Rewrites object schemas made with `allOf` (the derive's rendering of a flattened struct) as one
/// object: form encoders, schemathesis among them, and many client generators read a body's fields
/// from its top-level `properties` only, so a file field inside `allOf` would be sent as text.
pub(crate) fn flatten_objects(openapi: &mut utoipa::openapi::OpenApi) {
    let Some(components) = openapi.components.as_mut() else { return };
    for schema in components.schemas.values_mut() {
        let RefOr::T(Schema::AllOf(all_of)) = schema else { continue };
        let mut object = ObjectBuilder::new().schema_type(Type::Object).build();
        if all_of.items.iter().all(|item| merge_into(&mut object, item)) {
            object.description = all_of.description.clone();
            *schema = RefOr::T(Schema::Object(object));
        }
    }
}

/// Adds `schema`'s properties and required fields to `object`; false if it is not made of inline
/// objects alone.
fn merge_into(object: &mut Object, schema: &RefOr<Schema>) -> bool {
    match schema {
        RefOr::T(Schema::Object(o)) if o.schema_type == Type::Object.into() => {
            object.properties.extend(o.properties.iter().map(|(k, v)| (k.clone(), v.clone())));
            object.required.extend(o.required.iter().cloned());
            true
        }
        RefOr::T(Schema::AllOf(all_of)) => all_of.items.iter().all(|item| merge_into(object, item)),
        _ => false,
    }
}
