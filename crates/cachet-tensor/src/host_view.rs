//! Reading a tensor's values in place when it lives in host memory: the decode step's attention
//! reads the KV cache where it is instead of copying every key each token.

use burn::tensor::{DType, Tensor};

/// A strided view of an f32 tensor's values in host memory.
#[derive(Debug, Clone, Copy)]
pub struct HostStrided<'a, const D: usize> {
    /// The backing storage (the whole buffer, possibly larger than the view).
    pub storage: &'a [f32],
    /// Index in `storage` of the element at all-zero indices.
    pub offset: usize,
    /// Elements between neighbours along each dimension.
    pub strides: [usize; D],
    /// The view's shape.
    pub shape: [usize; D],
}

impl<const D: usize> HostStrided<'_, D> {
    /// The contiguous run of the last dimension at `index` (the leading `D - 1` indices), or
    /// `None` when the last dimension is not contiguous.
    pub fn row(&self, index: [usize; D]) -> Option<&[f32]> {
        if D == 0 || (self.strides[D - 1] != 1 && self.shape[D - 1] > 1) {
            return None;
        }
        let start = self.offset
            + index
                .iter()
                .zip(&self.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        self.storage.get(start..start + self.shape[D - 1])
    }
}

/// Calls `read` on the values of `tensor` in place, without a copy, when it is an f32 tensor on
/// the host backend with non-negative strides that stay inside its storage; `None` otherwise
/// (another backend or dtype: callers fall back to [`Tensor::into_data`] or tensor ops).
pub fn read_host_f32<const D: usize, R>(
    tensor: &Tensor<D>,
    read: impl FnOnce(HostStrided<'_, D>) -> R,
) -> Option<R> {
    if tensor.dtype() != DType::F32 {
        return None;
    }
    imp::read(tensor, read)
}

#[cfg(feature = "flex")]
mod imp {
    use super::{HostStrided, Tensor};
    use burn::backend::Flex;

    pub(super) fn read<const D: usize, R>(
        tensor: &Tensor<D>,
        read: impl FnOnce(HostStrided<'_, D>) -> R,
    ) -> Option<R> {
        let flex = tensor.clone().try_into_primitive::<Flex>().ok()?;
        let layout = flex.layout();
        let shape: [usize; D] = tensor.dims();
        let mut strides = [0usize; D];
        for (s, &stride) in strides.iter_mut().zip(layout.strides()) {
            *s = usize::try_from(stride).ok()?;
        }
        // The tensor's dtype was checked to be f32 (`storage` asserts it).
        let storage: &[f32] = flex.storage::<f32>();
        let offset = layout.start_offset();
        // The last element the view reaches must lie inside the storage.
        let last = shape
            .iter()
            .zip(&strides)
            .try_fold(offset, |acc, (&n, &s)| {
                if n == 0 {
                    None
                } else {
                    acc.checked_add((n - 1).checked_mul(s)?)
                }
            });
        match last {
            Some(last) if last < storage.len() => Some(read(HostStrided {
                storage,
                offset,
                strides,
                shape,
            })),
            // An empty view reads nothing.
            None if shape.contains(&0) => Some(read(HostStrided {
                storage: &[],
                offset: 0,
                strides,
                shape,
            })),
            _ => None,
        }
    }
}

#[cfg(not(feature = "flex"))]
mod imp {
    use super::{HostStrided, Tensor};

    pub(super) fn read<const D: usize, R>(
        _tensor: &Tensor<D>,
        _read: impl FnOnce(HostStrided<'_, D>) -> R,
    ) -> Option<R> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn a_sliced_host_tensor_is_read_in_place_with_its_strides() {
        let device = crate::cpu_device().unwrap();
        let values: Vec<f32> = (0..2 * 3 * 8 * 4).map(|v| v as f32).collect();
        let t = Tensor::<4>::from_data(TensorData::new(values.clone(), [2, 3, 8, 4]), &device);
        // A cache-like view: the first 5 of 8 slots.
        let view = t.clone().slice([0..2, 0..3, 0..5, 0..4]);
        let expected = view
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let got = read_host_f32(&view, |h| {
            assert_eq!(h.shape, [2, 3, 5, 4]);
            let mut out = Vec::new();
            for b in 0..2 {
                for head in 0..3 {
                    for s in 0..5 {
                        out.extend_from_slice(h.row([b, head, s, 0]).unwrap());
                    }
                }
            }
            out
        })
        .expect("a host f32 tensor is readable in place");
        assert_eq!(got, expected);
    }

    #[test]
    fn other_dtypes_are_not_read_in_place() {
        let device = crate::cpu_device().unwrap();
        let t = Tensor::<2>::zeros([2, 2], (&device, DType::F16));
        assert!(read_host_f32(&t, |_| ()).is_none());
    }
}
