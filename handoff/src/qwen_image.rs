//! The Qwen-Image stage payloads: [`Phase1`] (encoder → DiT: prompt embeddings and masks, one VAE
//! latent per input image) and [`Phase2`] (DiT → decoder: final latents), by tensor name.
//! Input image `i` travels as `image_latents.i`; the images arrive in that order or not at all
//! (a gap is refused, so no image is silently dropped).

use tch::Device;
use x2v_models::qwen_image::pipeline::{ImageGeometry, MAX_INPUT_IMAGES, Phase1, Phase2};
use x2v_transfer::TensorMeta;

use crate::{Collected, Handoff, PayloadError, TensorPart, tensor_to_part};

/// The wire names of the input-image latents, `image_latents.0` …
const IMAGE_NAMES: &[&str] = Phase1::NAMES.as_slice().split_at(4).1;

impl Handoff for Phase1 {
    type Geometry = ImageGeometry;
    const PHASE: &'static str = "Phase1";
    const NAMES: &'static [&'static str] = &Phase1::NAMES;

    fn to_parts(&self) -> Result<Vec<TensorPart>, PayloadError> {
        if self.image_latents.len() > MAX_INPUT_IMAGES {
            return Err(PayloadError::Malformed {
                name: "image_latents".into(),
                message: format!(
                    "{} input images, at most {MAX_INPUT_IMAGES} travel",
                    self.image_latents.len()
                ),
            });
        }
        let optional = [
            ("prompt_mask", self.prompt_mask.as_ref()),
            ("negative_prompt_embeds", self.negative_prompt_embeds.as_ref()),
            ("negative_prompt_mask", self.negative_prompt_mask.as_ref()),
        ];
        let present = optional.into_iter().filter_map(|(n, t)| t.map(|t| (n, t)));
        let images = IMAGE_NAMES.iter().copied().zip(&self.image_latents);
        std::iter::once(("prompt_embeds", &self.prompt_embeds))
            .chain(present)
            .chain(images)
            .map(|(name, t)| tensor_to_part(name, t))
            .collect()
    }

    /// `prompt_embeds` is required; `image_latents.i` must be contiguous from 0.
    fn from_parts<'a>(
        geometry: ImageGeometry,
        parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
        device: Device,
    ) -> Result<Self, PayloadError> {
        let mut named = Collected::of::<Self>(parts, device)?;
        let mut image_latents = Vec::new();
        for (i, name) in IMAGE_NAMES.iter().enumerate() {
            let Some(t) = named.take(name) else { continue };
            if i != image_latents.len() {
                return Err(PayloadError::Malformed {
                    name: (*name).to_owned(),
                    message: format!("arrived without image_latents.{}", image_latents.len()),
                });
            }
            image_latents.push(t);
        }
        Ok(Phase1 {
            geometry,
            prompt_embeds: named.require("prompt_embeds")?,
            prompt_mask: named.take("prompt_mask"),
            negative_prompt_embeds: named.take("negative_prompt_embeds"),
            negative_prompt_mask: named.take("negative_prompt_mask"),
            image_latents,
        })
    }
}

impl Handoff for Phase2 {
    type Geometry = ImageGeometry;
    const PHASE: &'static str = "Phase2";
    const NAMES: &'static [&'static str] = &Phase2::NAMES;

    fn to_parts(&self) -> Result<Vec<TensorPart>, PayloadError> {
        Ok(vec![tensor_to_part("latents", &self.latents)?])
    }

    /// Exactly `latents`.
    fn from_parts<'a>(
        geometry: ImageGeometry,
        parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
        device: Device,
    ) -> Result<Self, PayloadError> {
        let mut named = Collected::of::<Self>(parts, device)?;
        Ok(Phase2 { geometry, latents: named.require("latents")? })
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;
    use crate::tests::meta;

    fn send(p: &Phase1) -> (Vec<TensorPart>, Vec<TensorMeta>) {
        let parts = p.to_parts().unwrap();
        let metas = parts.iter().map(meta).collect();
        (parts, metas)
    }

    #[test]
    fn phase1_carries_every_input_image_in_order() {
        let g = ImageGeometry { height: 64, width: 96 };
        let r = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
        let p1 = Phase1 {
            geometry: g,
            prompt_embeds: r(&[1, 9, 32]).to_kind(Kind::BFloat16),
            prompt_mask: None,
            negative_prompt_embeds: Some(r(&[1, 5, 32])),
            negative_prompt_mask: Some(Tensor::ones([1, 5], (Kind::Int64, Device::Cpu))),
            image_latents: vec![r(&[1, 16, 1, 8, 12]), r(&[1, 16, 1, 12, 8]), r(&[1, 16, 1, 4, 4])],
        };
        let (parts, metas) = send(&p1);
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "prompt_embeds",
                "negative_prompt_embeds",
                "negative_prompt_mask",
                "image_latents.0",
                "image_latents.1",
                "image_latents.2"
            ]
        );
        // Arrival order does not matter; the image order does.
        let pairs = metas.iter().zip(&parts).rev().map(|(m, p)| (m, &p.bytes[..]));
        let back = Phase1::from_parts(g, pairs, Device::Cpu).unwrap();
        assert_eq!(back.geometry, g);
        assert!(back.prompt_embeds.equal(&p1.prompt_embeds));
        assert!(back.prompt_mask.is_none());
        assert_eq!(back.image_latents.len(), 3);
        for (a, b) in back.image_latents.iter().zip(&p1.image_latents) {
            assert!(a.equal(b));
        }

        // A missing image in the middle is refused rather than shifting the others.
        let gap = metas
            .iter()
            .zip(&parts)
            .filter(|(m, _)| m.name != "image_latents.1")
            .map(|(m, p)| (m, &p.bytes[..]));
        let err = Phase1::from_parts(g, gap, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("without image_latents.1"), "{err}");
    }

    #[test]
    fn phase2_is_exactly_latents() {
        let g = ImageGeometry { height: 32, width: 32 };
        let p2 = Phase2 {
            geometry: g,
            latents: Tensor::randn(g.latent_shape(), (Kind::Float, Device::Cpu)),
        };
        let parts = p2.to_parts().unwrap();
        let m = meta(&parts[0]);
        let back = Phase2::from_parts(g, [(&m, &parts[0].bytes[..])], Device::Cpu).unwrap();
        assert!(back.latents.equal(&p2.latents));
    }
}
