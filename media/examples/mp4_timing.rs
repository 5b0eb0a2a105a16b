//! Times `encode_mp4` on a Wan2.1-sized clip (81 frames of 832x480 at 16 fps) and prints one table
//! row. Run with `cargo run --release -p x2v-media --example mp4_timing`.

use std::time::Instant;

use x2v_media::{Frames, Mp4Options, encode_mp4, spritesheet_jpeg, thumbnail_webp};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (frames, height, width, fps) = (81, 480, 832, 16);
    let mut data = Vec::with_capacity(frames * height * width * 3);
    for f in 0..frames {
        for y in 0..height {
            for x in 0..width {
                let (xs, ys) = (x + 3 * f, y + f);
                data.extend([
                    (xs * 255 / width) as u8,
                    (ys * 255 / height) as u8,
                    ((xs + ys) % 256) as u8,
                ]);
            }
        }
    }
    let clip = Frames::new(&data, frames, height, width)?;

    let start = Instant::now();
    let mp4 = encode_mp4(&clip, fps, &Mp4Options::default())?;
    let mp4_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let thumb = thumbnail_webp(&clip, 320)?;
    let sheet = spritesheet_jpeg(&clip, &Default::default())?;
    let previews_s = start.elapsed().as_secs_f64();

    println!("| clip | mp4 s | fps encoded | mp4 bytes | thumbnail+sprites s |");
    println!("|---|---|---|---|---|");
    println!(
        "| {frames}x{width}x{height} | {mp4_s:.2} | {:.1} | {} | {previews_s:.2} ({} + {} bytes) |",
        frames as f64 / mp4_s,
        mp4.len(),
        thumb.len(),
        sheet.len()
    );
    Ok(())
}
