//! Scenes of the shapes world: sampling (seeded) and drawing.
//!
//! An image is 64 to 512 px a side with an aspect ratio of at most 2:1, on a white or lightly
//! tinted background, with 1 to 4 non-overlapping flat shapes (circle, square, triangle) in one
//! of six colours, each drawn in a shade sampled from the range people call that colour, each
//! 10-35% of the image's shorter side. A video is 4 frames of one shape moving left, right, up
//! or down. Edges are anti-aliased (4x4 supersampling).

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The shapes, in their canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

/// The colours, in their canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

/// Directions of motion in a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Motion {
    Left,
    Right,
    Up,
    Down,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

impl Colour {
    pub const ALL: [Colour; 6] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Purple, Colour::Orange];
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// The shades called this colour: hue range in degrees (may start below 0), then saturation
    /// and value ranges (HSV, 0..1).
    fn shades(self) -> ((f32, f32), (f32, f32), (f32, f32)) {
        match self {
            Colour::Red => ((-8.0, 6.0), (0.65, 1.0), (0.65, 1.0)),
            Colour::Orange => ((20.0, 34.0), (0.75, 1.0), (0.88, 1.0)),
            Colour::Yellow => ((49.0, 60.0), (0.65, 1.0), (0.88, 1.0)),
            Colour::Green => ((95.0, 145.0), (0.55, 1.0), (0.45, 0.9)),
            Colour::Blue => ((205.0, 238.0), (0.6, 1.0), (0.55, 1.0)),
            Colour::Purple => ((268.0, 292.0), (0.45, 0.85), (0.45, 0.85)),
        }
    }

    /// A shade of this colour.
    pub fn sample_rgb<R: Rng>(self, rng: &mut R) -> [u8; 3] {
        let ((h0, h1), (s0, s1), (v0, v1)) = self.shades();
        hsv_to_rgb(rng.gen_range(h0..h1), rng.gen_range(s0..s1), rng.gen_range(v0..v1))
    }
}

impl Motion {
    pub const ALL: [Motion; 4] = [Motion::Left, Motion::Right, Motion::Up, Motion::Down];
    pub fn word(self) -> &'static str {
        match self {
            Motion::Left => "left",
            Motion::Right => "right",
            Motion::Up => "up",
            Motion::Down => "down",
        }
    }
    /// Unit step in image coordinates (y grows downwards).
    fn step(self) -> (f32, f32) {
        match self {
            Motion::Left => (-1.0, 0.0),
            Motion::Right => (1.0, 0.0),
            Motion::Up => (0.0, -1.0),
            Motion::Down => (0.0, 1.0),
        }
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [u8; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    let q = |u: f32| ((u + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    [q(r), q(g), q(b)]
}

/// One shape placed in an image: centre and size (side, diameter, or the triangle's base and
/// height) in pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub shape: Shape,
    pub colour: Colour,
    pub rgb: [u8; 3],
    pub x: f32,
    pub y: f32,
    pub size: f32,
}

impl Placed {
    /// Fraction of the pixel at (px, py) covered, from 4x4 subsamples.
    fn coverage(&self, px: usize, py: usize) -> f32 {
        let mut n = 0;
        for sy in 0..4 {
            for sx in 0..4 {
                let x = px as f32 + (sx as f32 + 0.5) / 4.0;
                let y = py as f32 + (sy as f32 + 0.5) / 4.0;
                if self.contains(x, y) {
                    n += 1;
                }
            }
        }
        n as f32 / 16.0
    }

    fn contains(&self, x: f32, y: f32) -> bool {
        let h = self.size / 2.0;
        let (dx, dy) = (x - self.x, y - self.y);
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= h * h,
            Shape::Square => dx.abs() <= h && dy.abs() <= h,
            // Apex at the top centre, base along the bottom of the bounding square.
            Shape::Triangle => (-h..=h).contains(&dy) && dx.abs() <= (dy + h) / 2.0,
        }
    }

    /// Bounding box (x0, y0, x1, y1).
    fn bounds(&self) -> (f32, f32, f32, f32) {
        let h = self.size / 2.0;
        (self.x - h, self.y - h, self.x + h, self.y + h)
    }
}

/// A still image, or one frame of a video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub width: usize,
    pub height: usize,
    pub background: [u8; 3],
    pub shapes: Vec<Placed>,
}

/// A video: the same shape in each frame, moving one way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Video {
    pub frames: Vec<Scene>,
    pub motion: Motion,
}

/// Frames per video.
pub const VIDEO_FRAMES: usize = 4;

fn sample_canvas<R: Rng>(rng: &mut R) -> (usize, usize, [u8; 3]) {
    let (w, h) = loop {
        let w: usize = rng.gen_range(64..=512);
        let h: usize = rng.gen_range(64..=512);
        if w.max(h) <= 2 * w.min(h) {
            break (w, h);
        }
    };
    let background = if rng.gen_bool(0.4) {
        [255, 255, 255]
    } else {
        hsv_to_rgb(rng.gen_range(0.0..360.0), rng.gen_range(0.0..0.1), rng.gen_range(0.93..1.0))
    };
    (w, h, background)
}

fn sample_look<R: Rng>(rng: &mut R) -> (Shape, Colour, [u8; 3]) {
    let shape = Shape::ALL[rng.gen_range(0..Shape::ALL.len())];
    let colour = Colour::ALL[rng.gen_range(0..Colour::ALL.len())];
    (shape, colour, colour.sample_rgb(rng))
}

/// A random still image with `count` shapes (1..=4).
pub fn sample_scene<R: Rng>(rng: &mut R, count: usize) -> Scene {
    let (width, height, background) = sample_canvas(rng);
    let short = width.min(height) as f32;
    let gap = (0.04 * short).max(2.0);
    'retry: loop {
        let mut shapes: Vec<Placed> = Vec::with_capacity(count);
        for _ in 0..count {
            let size = rng.gen_range(0.10..=0.35) * short;
            let (shape, colour, rgb) = sample_look(rng);
            let mut placed = None;
            for _ in 0..100 {
                let x = rng.gen_range(size / 2.0..=width as f32 - size / 2.0);
                let y = rng.gen_range(size / 2.0..=height as f32 - size / 2.0);
                let p = Placed { shape, colour, rgb, x, y, size };
                let (a0, b0, a1, b1) = p.bounds();
                let clear = shapes.iter().all(|q| {
                    let (c0, d0, c1, d1) = q.bounds();
                    a1 + gap <= c0 || c1 + gap <= a0 || b1 + gap <= d0 || d1 + gap <= b0
                });
                if clear {
                    placed = Some(p);
                    break;
                }
            }
            match placed {
                Some(p) => shapes.push(p),
                None => continue 'retry,
            }
        }
        return Scene { width, height, background, shapes };
    }
}

/// A random video of one shape moving one way, fully inside the frame throughout.
pub fn sample_video<R: Rng>(rng: &mut R) -> Video {
    let (width, height, background) = sample_canvas(rng);
    let short = width.min(height) as f32;
    let size = rng.gen_range(0.10..=0.30) * short;
    let (shape, colour, rgb) = sample_look(rng);
    let motion = Motion::ALL[rng.gen_range(0..Motion::ALL.len())];
    let (ux, uy) = motion.step();
    let along = if ux != 0.0 { width as f32 } else { height as f32 };
    // Three steps of 8-16% of the image along the motion: the shape is at most 30% of the
    // shorter side, so shape and travel (at most 48%) always fit.
    let step = rng.gen_range(0.08..=0.16f32) * along;
    let travel = 3.0 * step;
    let lo = |extent: f32| size / 2.0..=(extent - size / 2.0);
    let (mut x, mut y) = (rng.gen_range(lo(width as f32)), rng.gen_range(lo(height as f32)));
    // Start far enough back that the last frame is still inside.
    if ux != 0.0 {
        let (a, b) = (size / 2.0, width as f32 - size / 2.0 - travel);
        x = rng.gen_range(a..=b.max(a));
        if ux < 0.0 {
            x = width as f32 - x;
        }
    } else {
        let (a, b) = (size / 2.0, height as f32 - size / 2.0 - travel);
        y = rng.gen_range(a..=b.max(a));
        if uy < 0.0 {
            y = height as f32 - y;
        }
    }
    let frames = (0..VIDEO_FRAMES)
        .map(|i| {
            let t = i as f32 * step;
            let p = Placed { shape, colour, rgb, x: x + ux * t, y: y + uy * t, size };
            Scene { width, height, background, shapes: vec![p] }
        })
        .collect();
    Video { frames, motion }
}

impl Scene {
    /// The picture, RGB.
    pub fn draw(&self) -> image::RgbImage {
        let mut img = image::RgbImage::from_pixel(self.width as u32, self.height as u32, image::Rgb(self.background));
        for p in &self.shapes {
            let (x0, y0, x1, y1) = p.bounds();
            let clampx = |v: f32| (v.max(0.0) as usize).min(self.width);
            let clampy = |v: f32| (v.max(0.0) as usize).min(self.height);
            for py in clampy(y0.floor())..clampy(y1.ceil() + 1.0) {
                for px in clampx(x0.floor())..clampx(x1.ceil() + 1.0) {
                    let c = p.coverage(px, py);
                    if c > 0.0 {
                        let dst = img.get_pixel_mut(px as u32, py as u32);
                        for k in 0..3 {
                            let v = dst.0[k] as f32 * (1.0 - c) + p.rgb[k] as f32 * c;
                            dst.0[k] = v.round().clamp(0.0, 255.0) as u8;
                        }
                    }
                }
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn scenes_respect_the_contract() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for i in 0..300 {
            let s = sample_scene(&mut rng, 1 + i % 4);
            assert!((64..=512).contains(&s.width) && (64..=512).contains(&s.height));
            assert!(s.width.max(s.height) <= 2 * s.width.min(s.height));
            assert_eq!(s.shapes.len(), 1 + i % 4);
            let short = s.width.min(s.height) as f32;
            for p in &s.shapes {
                assert!(p.size >= 0.10 * short - 1e-3 && p.size <= 0.35 * short + 1e-3);
                let (x0, y0, x1, y1) = p.bounds();
                assert!(x0 >= -1e-3 && y0 >= -1e-3 && x1 <= s.width as f32 + 1e-3 && y1 <= s.height as f32 + 1e-3);
            }
        }
    }

    #[test]
    fn videos_stay_inside_and_move_the_right_way() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for _ in 0..300 {
            let v = sample_video(&mut rng);
            assert_eq!(v.frames.len(), VIDEO_FRAMES);
            let xs: Vec<(f32, f32)> = v.frames.iter().map(|f| (f.shapes[0].x, f.shapes[0].y)).collect();
            for f in &v.frames {
                let (x0, y0, x1, y1) = f.shapes[0].bounds();
                assert!(x0 >= -1e-2 && y0 >= -1e-2 && x1 <= f.width as f32 + 1e-2 && y1 <= f.height as f32 + 1e-2, "{v:?}");
            }
            let (dx, dy) = (xs[3].0 - xs[0].0, xs[3].1 - xs[0].1);
            let want = match v.motion {
                Motion::Left => dx < 0.0 && dy == 0.0,
                Motion::Right => dx > 0.0 && dy == 0.0,
                Motion::Up => dy < 0.0 && dx == 0.0,
                Motion::Down => dy > 0.0 && dx == 0.0,
            };
            assert!(want, "{:?} moved by ({dx}, {dy})", v.motion);
        }
    }

    #[test]
    fn drawing_paints_the_shape_colour_at_its_centre() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..50 {
            let s = sample_scene(&mut rng, 2);
            let img = s.draw();
            for p in &s.shapes {
                // A point surely inside every shape kind: a bit below the centre.
                let px = img.get_pixel(p.x as u32, (p.y + p.size * 0.2) as u32);
                assert_eq!(px.0, p.rgb);
            }
            assert_eq!(img.get_pixel(0, 0).0.len(), 3);
        }
    }
}
