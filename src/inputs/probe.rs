//! Probe batches: the shipped CIFAR-10 subset, CIFAR-10 binary files and `.npy` pairs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array4, ArrayD};

use crate::inputs::npy;
use crate::onnx::HostTensor;

/// 100 images per class of the CIFAR-10 test set (see data/README.md).
pub static SHIPPED_CIFAR10: &[u8] = include_bytes!("../../data/cifar10_probe.bin");
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
const RECORD: usize = 3073;

/// A labelled probe batch, sample axis first, already normalised.
#[derive(Clone, Debug)]
pub struct Probe {
    pub images: ArrayD<f32>,
    pub labels: Array1<i64>,
    /// Where it came from, for reports.
    pub source: String,
}

impl Probe {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn sample_shape(&self) -> &[usize] {
        &self.images.shape()[1..]
    }

    /// Take `n` images class-balanced from CIFAR-10 binary records: classes in order, each
    /// getting ⌊n/10⌋ images and the first n mod 10 classes one more (docs/cli.md, Probe), the first
    /// images of each class in file order. Samples are ordered by class.
    pub fn from_cifar10_bytes(bytes: &[u8], n: usize, source: &str) -> Result<Probe> {
        Self::from_cifar10_bytes_skipping(bytes, n, 0, source)
    }

    /// As [`Probe::from_cifar10_bytes`], skipping the first `skip` images of each class: draws
    /// with `skip = d · ⌈n/10⌉`, d = 0, 1, …, are class-balanced and share no image.
    pub fn from_cifar10_bytes_skipping(
        bytes: &[u8],
        n: usize,
        skip: usize,
        source: &str,
    ) -> Result<Probe> {
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            bail!(
                "{source}: size {} is not a multiple of the CIFAR-10 record size {RECORD}",
                bytes.len()
            );
        }
        if n == 0 {
            bail!("--n 0: the probe needs at least one sample");
        }
        let mut by_class: Vec<Vec<usize>> = vec![vec![]; 10];
        for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
            let l = rec[0] as usize;
            if l >= 10 {
                bail!("{source}: record {i} has label {l}; CIFAR-10 labels are 0..9");
            }
            by_class[l].push(i);
        }
        let mut picks = vec![];
        for (c, idx) in by_class.iter().enumerate() {
            let want = n / 10 + usize::from(c < n % 10);
            if idx.len() < skip + want {
                bail!(
                    "{source}: class {c} has {} images but a balanced probe of {n} needs {want}{}",
                    idx.len(),
                    if skip > 0 {
                        format!(" after skipping {skip}")
                    } else {
                        String::new()
                    }
                );
            }
            picks.extend(idx[skip..skip + want].iter().map(|&i| (i, c)));
        }
        let mut images = Array4::<f32>::zeros((n, 3, 32, 32));
        let mut labels = Array1::<i64>::zeros(n);
        for (s, &(i, c)) in picks.iter().enumerate() {
            let rec = &bytes[i * RECORD + 1..(i + 1) * RECORD];
            for ch in 0..3 {
                for p in 0..1024 {
                    let v = rec[ch * 1024 + p] as f32 / 255.0;
                    images[[s, ch, p / 32, p % 32]] = (v - CIFAR10_MEAN[ch]) / CIFAR10_STD[ch];
                }
            }
            labels[s] = c as i64;
        }
        Ok(Probe {
            images: images.into_dyn(),
            labels,
            source: source.to_string(),
        })
    }

    /// Draw `draw` (0 = the default probe) of `n` shipped images: class-balanced, disjoint from
    /// every other draw of the same `n`.
    pub fn shipped_draw(n: usize, draw: usize) -> Result<Probe> {
        let per_class = n.div_ceil(10);
        Self::from_cifar10_bytes_skipping(
            SHIPPED_CIFAR10,
            n,
            draw * per_class,
            &format!("shipped CIFAR-10 probe, draw {draw}"),
        )
    }

    pub fn shipped(n: usize) -> Result<Probe> {
        if n > 1000 {
            bail!("--n {n}: the shipped CIFAR-10 probe holds 1000 images (100 per class); pass --data for more");
        }
        Self::from_cifar10_bytes(
            SHIPPED_CIFAR10,
            n,
            "shipped CIFAR-10 probe (data/cifar10_probe.bin)",
        )
    }

    /// `X.npy` (float32, N×C×…, already normalised) with `Y.npy` (int64 labels).
    pub fn from_npy(x: &Path, y: &Path, n: Option<usize>) -> Result<Probe> {
        let images = match npy::read(x)? {
            HostTensor::F32(a) => a,
            HostTensor::F64(a) => a.mapv(|v| v as f32),
            other => bail!(
                "--data {}: images must be float32, got {:?}",
                x.display(),
                other.dtype()
            ),
        };
        let labels = match npy::read(y)? {
            HostTensor::I64(a) => a,
            other => bail!(
                "--labels {}: labels must be int64, got {:?}",
                y.display(),
                other.dtype()
            ),
        };
        let mut probe = Self::from_arrays(
            images,
            labels,
            n,
            &format!("--data {}", x.display()),
            &format!("--labels {}", y.display()),
        )?;
        probe.source = x.display().to_string();
        Ok(probe)
    }

    /// A probe from in-memory arrays (float32 N×…, int64 labels of length N), the first `n`
    /// rows (all by default). `data`/`labels` name the arrays in messages.
    pub fn from_arrays(
        images: ArrayD<f32>,
        labels: ArrayD<i64>,
        n: Option<usize>,
        data: &str,
        labels_name: &str,
    ) -> Result<Probe> {
        let (x, y) = (data, labels_name);
        if labels.ndim() != 1 {
            bail!(
                "{}: expected a 1-D array, got shape {:?}",
                y,
                labels.shape()
            );
        }
        if images.ndim() < 2 || images.shape()[0] != labels.len() {
            bail!(
                "{} has shape {:?} but {} has {} labels; the first axis must match",
                x,
                images.shape(),
                y,
                labels.len()
            );
        }
        let total = labels.len();
        let n = n.unwrap_or(total);
        if n == 0 || total == 0 {
            bail!("{}: the probe is empty (0 samples)", x);
        }
        if n > total {
            bail!("--n {n} but {} holds only {total} samples", x);
        }
        let images = images
            .slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..n))
            .to_owned();
        let labels = labels
            .slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..n))
            .to_owned();
        let labels = labels.into_shape_with_order(n)?;
        if images.iter().any(|v| !v.is_finite()) {
            bail!("{}: the images contain NaN or infinite values", x);
        }
        Ok(Probe {
            images,
            labels,
            source: x.to_string(),
        })
    }

    /// Resolve the probe options of the CLI.
    pub fn from_options(
        data: Option<&Path>,
        labels: Option<&Path>,
        n: Option<usize>,
        model_wants_cifar10: bool,
    ) -> Result<Probe> {
        match data {
            None => {
                if labels.is_some() {
                    bail!("--labels needs --data");
                }
                if !model_wants_cifar10 {
                    bail!(
                        "the model does not take 3×32×32 images with 10 outputs, so the shipped CIFAR-10 probe \
                         does not fit: pass --data X.npy --labels Y.npy"
                    );
                }
                Self::shipped(n.unwrap_or(64))
            }
            Some(p) if p.extension().is_some_and(|e| e == "bin") => {
                if labels.is_some() {
                    bail!("--labels is not used with a CIFAR-10 .bin file (labels are inside it)");
                }
                let bytes = std::fs::read(p)
                    .with_context(|| format!("--data: cannot read {}", p.display()))?;
                Self::from_cifar10_bytes(&bytes, n.unwrap_or(64), &p.display().to_string())
            }
            Some(p) => {
                let y: PathBuf = match labels {
                    Some(y) => y.to_path_buf(),
                    None => bail!(
                        "--data {} needs --labels Y.npy (int64, one label per image)",
                        p.display()
                    ),
                };
                Self::from_npy(p, &y, n)
            }
        }
    }

    /// Check labels against the number of classes of the model.
    pub fn check_labels(&self, classes: usize) -> Result<()> {
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l < 0 || l as usize >= classes)
        {
            bail!(
                "label {l} of sample {i} ({}) is outside the model's {classes} classes",
                self.source
            );
        }
        Ok(())
    }

    pub fn images_tensor(&self) -> HostTensor {
        HostTensor::F32(self.images.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_probe_is_balanced_and_normalised() {
        let p = Probe::shipped(64).unwrap();
        assert_eq!(p.images.shape(), &[64, 3, 32, 32]);
        let mut counts = [0; 10];
        for &l in &p.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]);
        // Normalised pixel values span roughly [-2, 2.2].
        let (lo, hi) = p
            .images
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(
            lo < -1.5 && lo >= -1.99 - 1e-3 && hi > 1.5 && hi <= 2.13 + 1e-3,
            "{lo} {hi}"
        );
    }

    #[test]
    fn zero_samples_is_an_error() {
        assert!(Probe::shipped(0)
            .unwrap_err()
            .to_string()
            .contains("at least one"));
    }
}
