//! A dense f32 tensor in row-major (PyTorch "contiguous") layout.

/// Shape + data; the CPU executor's value and every weight after loading.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// `data.len()` must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(numel(&shape), data.len());
        Tensor { shape, data }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; numel(shape)],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Relative L2 error of `self` against `reference`: ||a - b|| / ||b||.
    pub fn rel_l2(&self, reference: &Tensor) -> f64 {
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in self.data.iter().zip(&reference.data) {
            let d = f64::from(*a) - f64::from(*b);
            num += d * d;
            den += f64::from(*b) * f64::from(*b);
        }
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}
