//! Thumbnails, spritesheets and still images decoded back with the `image` crate.

mod common;

use common::{moving_gradient, psnr};
use image::ImageFormat as Decoded;
use x2v_media::{
    Frames, ImageFormat, SpriteGrid, SpriteOptions, encode_image, spritesheet_jpeg, thumbnail_webp,
};

fn decode(bytes: &[u8], format: Decoded) -> image::RgbImage {
    assert_eq!(image::guess_format(bytes).unwrap(), format, "magic bytes");
    image::load_from_memory_with_format(bytes, format).unwrap().to_rgb8()
}

#[test]
fn thumbnail_is_the_first_frame_scaled_to_fit() {
    let (f, h, w) = (3, 480, 832);
    let data = moving_gradient(f, h, w);
    let frames = Frames::new(&data, f, h, w).unwrap();
    for (max_side, want) in
        [(320, (320, 185)), (100, (100, 58)), (832, (832, 480)), (2000, (832, 480))]
    {
        let thumb = decode(&thumbnail_webp(&frames, max_side).unwrap(), Decoded::WebP);
        assert_eq!(thumb.dimensions(), want, "max_side {max_side}");
    }
    // Unscaled, lossless: exactly the first frame.
    let full = decode(&thumbnail_webp(&frames, 1000).unwrap(), Decoded::WebP);
    assert!(full.as_raw() == frames.frame(0), "unscaled thumbnail differs from frame 0");
}

#[test]
fn portrait_thumbnail_fits_its_height() {
    let (f, h, w) = (1, 832, 480);
    let data = moving_gradient(f, h, w);
    let thumb = thumbnail_webp(&Frames::new(&data, f, h, w).unwrap(), 256).unwrap();
    assert_eq!(decode(&thumb, Decoded::WebP).dimensions(), (148, 256));
}

#[test]
fn spritesheet_is_a_grid_of_evenly_spaced_frames() {
    let (f, h, w) = (81, 96, 208);
    // Each frame one flat grey level, so a tile shows which frame it came from.
    let data: Vec<u8> =
        (0..f).flat_map(|i| std::iter::repeat_n((i * 3) as u8, h * w * 3)).collect();
    let frames = Frames::new(&data, f, h, w).unwrap();
    let opts = SpriteOptions::default();
    let grid = SpriteGrid::new(&frames, &opts).unwrap();
    let sheet = decode(&spritesheet_jpeg(&frames, &opts).unwrap(), Decoded::Jpeg);
    assert_eq!((grid.columns, grid.rows, grid.tile_width, grid.tile_height), (10, 2, 160, 74));
    assert_eq!(sheet.dimensions(), (1600, 148));
    for tile in 0..grid.tiles {
        let (x, y) = ((tile % 10) * 160 + 80, (tile / 10) * 74 + 37);
        let level = sheet.get_pixel(x as u32, y as u32)[0] as i32;
        let want = (grid.frame_of_tile(tile, f) * 3) as i32;
        assert!((level - want).abs() <= 3, "tile {tile}: grey {level}, want {want}");
    }
}

#[test]
fn still_images_round_trip() {
    let (h, w) = (96, 128);
    let rgb = moving_gradient(1, h, w);
    for compression in [None, Some(0), Some(50), Some(100)] {
        let png = encode_image(&rgb, w, h, ImageFormat::Png, compression).unwrap();
        assert!(decode(&png, Decoded::Png).as_raw() == &rgb, "PNG {compression:?} is not exact");
        let webp = encode_image(&rgb, w, h, ImageFormat::Webp, compression).unwrap();
        assert!(
            decode(&webp, Decoded::WebP).as_raw() == &rgb,
            "WebP {compression:?} is not lossless"
        );
    }
    let jpeg = |c| decode(&encode_image(&rgb, w, h, ImageFormat::Jpeg, c).unwrap(), Decoded::Jpeg);
    let default = psnr(jpeg(None).as_raw(), &rgb);
    assert!(default >= 35.0, "JPEG at the default quality: PSNR {default:.2} dB");
    let rough = psnr(jpeg(Some(80)).as_raw(), &rgb);
    assert!(rough < default, "more compression must cost quality: {rough:.2} vs {default:.2} dB");
    assert!(rough >= 25.0, "JPEG at quality 20: PSNR {rough:.2} dB");
}

#[test]
fn jpeg_compression_shrinks_the_file() {
    let (h, w) = (96, 128);
    let rgb = moving_gradient(1, h, w);
    let size = |c| encode_image(&rgb, w, h, ImageFormat::Jpeg, Some(c)).unwrap().len();
    assert!(size(90) < size(10), "compression 90 gives {} bytes, 10 gives {}", size(90), size(10));
}
