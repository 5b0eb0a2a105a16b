//! The Wan stage payloads: [`Phase1`] (encoder → DiT: prompt embeddings, I2V conditioning, V2V
//! input latents) and
//! [`Phase2`] (DiT → decoder: final latents), by tensor name.

use tch::Device;
use x2v_models::wan::pipeline::{Geometry, Phase1, Phase2};
use x2v_transfer::TensorMeta;

use crate::{Collected, Handoff, PayloadError, TensorPart, tensor_to_part};

impl Handoff for Phase1 {
    type Geometry = Geometry;
    const PHASE: &'static str = "Phase1";
    const NAMES: &'static [&'static str] = &Phase1::NAMES;

    fn to_parts(&self) -> Result<Vec<TensorPart>, PayloadError> {
        let optional = [
            ("negative_prompt_embeds", &self.negative_prompt_embeds),
            ("image_embeds", &self.image_embeds),
            ("condition", &self.condition),
            ("video_latents", &self.video_latents),
        ];
        let present = optional.into_iter().filter_map(|(n, t)| t.as_ref().map(|t| (n, t)));
        std::iter::once(("prompt_embeds", &self.prompt_embeds))
            .chain(present)
            .map(|(name, t)| tensor_to_part(name, t))
            .collect()
    }

    /// `prompt_embeds` is required, the other names of [`Phase1::NAMES`] optional.
    fn from_parts<'a>(
        geometry: Geometry,
        parts: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
        device: Device,
    ) -> Result<Self, PayloadError> {
        let mut named = Collected::of::<Self>(parts, device)?;
        Ok(Phase1 {
            geometry,
            prompt_embeds: named.require("prompt_embeds")?,
            negative_prompt_embeds: named.take("negative_prompt_embeds"),
            image_embeds: named.take("image_embeds"),
            condition: named.take("condition"),
            video_latents: named.take("video_latents"),
        })
    }
}

impl Handoff for Phase2 {
    type Geometry = Geometry;
    const PHASE: &'static str = "Phase2";
    const NAMES: &'static [&'static str] = &Phase2::NAMES;

    fn to_parts(&self) -> Result<Vec<TensorPart>, PayloadError> {
        Ok(vec![tensor_to_part("latents", &self.latents)?])
    }

    /// Exactly `latents`.
    fn from_parts<'a>(
        geometry: Geometry,
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

    #[test]
    fn phases_round_trip_by_name() {
        let g = Geometry { frames: 5, height: 64, width: 64 };
        let bf = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let p1 = Phase1 {
            geometry: g,
            prompt_embeds: bf(&[1, 7, 32]),
            negative_prompt_embeds: Some(bf(&[1, 3, 32])),
            image_embeds: None,
            condition: Some(Tensor::randn([1, 20, 2, 8, 8], (Kind::Float, Device::Cpu))),
            video_latents: Some(Tensor::randn([1, 16, 2, 8, 8], (Kind::Float, Device::Cpu))),
        };
        let parts = p1.to_parts().unwrap();
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["prompt_embeds", "negative_prompt_embeds", "condition", "video_latents"]
        );
        let metas: Vec<TensorMeta> = parts.iter().map(meta).collect();
        let pairs = metas.iter().zip(&parts).map(|(m, p)| (m, &p.bytes[..]));
        let back = Phase1::from_parts(g, pairs, Device::Cpu).unwrap();
        assert_eq!(back.geometry, g);
        assert!(back.prompt_embeds.equal(&p1.prompt_embeds));
        assert_eq!(back.prompt_embeds.kind(), Kind::BFloat16);
        let neg = back.negative_prompt_embeds.unwrap();
        assert!(neg.equal(p1.negative_prompt_embeds.as_ref().unwrap()));
        assert!(back.image_embeds.is_none());
        assert!(back.condition.unwrap().equal(p1.condition.as_ref().unwrap()));
        assert!(back.video_latents.unwrap().equal(p1.video_latents.as_ref().unwrap()));

        // Without prompt_embeds, or with a foreign or repeated name, the payload is refused.
        let missing = metas.iter().zip(&parts).skip(1).map(|(m, p)| (m, &p.bytes[..]));
        let err = Phase1::from_parts(g, missing, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("lacks tensor `prompt_embeds`"), "{err}");
        let lat =
            tensor_to_part("latents", &Tensor::zeros([1], (Kind::Float, Device::Cpu))).unwrap();
        let lat_meta = meta(&lat);
        let err = Phase1::from_parts(g, [(&lat_meta, &lat.bytes[..])], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("unknown Phase1 tensor `latents`"), "{err}");
        let twice = [(&metas[0], &parts[0].bytes[..]), (&metas[0], &parts[0].bytes[..])];
        let err = Phase1::from_parts(g, twice, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`prompt_embeds` appears twice"), "{err}");

        let p2 = Phase2 {
            geometry: g,
            latents: Tensor::randn(g.latent_shape(), (Kind::Float, Device::Cpu)),
        };
        let p2_parts = p2.to_parts().unwrap();
        assert_eq!(p2_parts[0].name, "latents");
        let m = meta(&p2_parts[0]);
        let back = Phase2::from_parts(g, [(&m, &p2_parts[0].bytes[..])], Device::Cpu).unwrap();
        assert!(back.latents.equal(&p2.latents));
        let err =
            Phase2::from_parts(g, [(&metas[0], &parts[0].bytes[..])], Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("unknown Phase2 tensor `prompt_embeds`"), "{err}");
        let err = Phase2::from_parts(g, std::iter::empty(), Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("lacks tensor `latents`"), "{err}");
    }
}
