// DpjaxWinogradConv, DpjaxWinogradKernelGrad, DpjaxWinogradPanels: float32 stride-1 3x3
// convolutions (forward, and the input gradient on the mirrored kernel), their kernel gradients
// and their transformed kernels by Winograd's F(2x2, 3x3): 16 products per 2 x 2 outputs and
// channel pair where the direct GEMMs do 36; for maps larger than 6 x 6 (ResNet-18's first two
// stages).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dense_blocks.h"
#include "kernel_grad_blocks.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

// Winograd F(2x2, 3x3) (Lavin & Gray 2016) for float32 stride-1 3x3 convolutions on maps larger
// than the position-major ones: each 2 x 2 block of output pixels ("tile") reads a 4 x 4 patch
// d of the padded input, and y_tile = A^T [(G g G^T) ⊙ (B^T d B)] A. Per tile and channel pair
// that is 16 products where the direct convolution does 36: on ResNet-18's 19 x 19 and 10 x 10
// maps, 2.0-2.25x fewer FLOPs (the float32 step is bound by the FMA rate). The kernel comes
// transformed (U = G g G^T, `cpu_kernels.winograd_panels`) as (16, C_out / 32, C, 32) panels;
// a task transforms kWinogradTiles tiles' patches into V (16, tiles, C), multiplies each of the
// 16 elements' (tiles, C) rows with its panels into M (16, tiles, C_out) — PanelBlock's GEMM,
// its operands cache-resident — and transforms M back into y. Transforms only add and subtract,
// so products and sums are rounded as in a direct convolution, in a different order.
constexpr int64_t kWinogradTiles = 12;

// B^T d B for one 4 x 4 patch (16 channels per vector), d[row][col] → v[4 row + col].
inline void PatchTransform(const Vec16 d[4][4], Vec16 v[16]) {
  Vec16 t[4][4];
  for (int col = 0; col < 4; ++col) {
    t[0][col] = d[0][col] - d[2][col];
    t[1][col] = d[1][col] + d[2][col];
    t[2][col] = d[2][col] - d[1][col];
    t[3][col] = d[1][col] - d[3][col];
  }
  for (int row = 0; row < 4; ++row) {
    v[4 * row + 0] = t[row][0] - t[row][2];
    v[4 * row + 1] = t[row][1] + t[row][2];
    v[4 * row + 2] = t[row][2] - t[row][1];
    v[4 * row + 3] = t[row][1] - t[row][3];
  }
}

// A^T m A: m[4 row + col] → the tile's outputs y[row][col], 2 x 2.
inline void TileTransform(const Vec16 m[16], Vec16 y[2][2]) {
  Vec16 s[2][4];
  for (int col = 0; col < 4; ++col) {
    s[0][col] = m[col] + m[4 + col] + m[8 + col];
    s[1][col] = m[4 + col] - m[8 + col] - m[12 + col];
  }
  for (int row = 0; row < 2; ++row) {
    y[row][0] = s[row][0] + s[row][1] + s[row][2];
    y[row][1] = s[row][1] - s[row][2] - s[row][3];
  }
}

// The 2 x 2 output tiles of a 3x3 convolution of x padded (N, Hp, Wp, C) into (N, Ho, Wo, ·),
// Ho = Hp - 2 and Wo = Wp - 2, numbered image by image and row-major within one; a tile's
// output pixel (row, col) is also its 4 x 4 patch's corner in x.
struct WinogradTiles {
  int64_t n, hp, wp, c, ho, wo;

  int64_t Across() const { return (wo + 1) / 2; }
  int64_t PerImage() const { return (ho + 1) / 2 * Across(); }
  int64_t Count() const { return n * PerImage(); }
  int64_t Image(int64_t tile) const { return tile / PerImage(); }
  int64_t Row(int64_t tile) const { return tile % PerImage() / Across() * 2; }
  int64_t Col(int64_t tile) const { return tile % Across() * 2; }
};

// v (16, `rows`, C) [e][t] = B^T d B for tiles t = 0 .. count - 1 from `first`, d their patches.
void TransformPatches(const WinogradTiles& g, const float* x, int64_t first, int64_t count,
                      float* v, int64_t rows) {
  for (int64_t t = 0; t < count; ++t) {
    const int64_t image = g.Image(first + t), row = g.Row(first + t), col = g.Col(first + t);
    const float* patch = x + ((image * g.hp + row) * g.wp + col) * g.c;
    // Odd Ho or Wo: the last tiles' patches reach one row or column past the padded input.
    const int64_t inside_rows = std::min<int64_t>(4, g.hp - row);
    const int64_t inside_cols = std::min<int64_t>(4, g.wp - col);
    for (int64_t c0 = 0; c0 < g.c; c0 += 16) {
      Vec16 d[4][4], transformed[16];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          d[i][j] = i < inside_rows && j < inside_cols
                        ? Load16Floats(patch + (i * g.wp + j) * g.c + c0)
                        : Vec16{};
        }
      }
      PatchTransform(d, transformed);
      for (int e = 0; e < 16; ++e) {
        *reinterpret_cast<Vec16*>(v + (e * rows + t) * g.c + c0) = transformed[e];
      }
    }
  }
}

// Whether x (N, Hp, Wp, C), C a multiple of 16, and out (N, Hp - 2, Wp - 2, C_out), C_out a
// multiple of 32, are the operands of a Winograd convolution.
bool WinogradOperands(const ffi::Span<const int64_t>& x_dims,
                      const ffi::Span<const int64_t>& out_dims) {
  return x_dims.size() == 4 && out_dims.size() == 4 && x_dims[3] % 16 == 0 && x_dims[1] >= 3 &&
         x_dims[2] >= 3 && out_dims[0] == x_dims[0] && out_dims[1] == x_dims[1] - 2 &&
         out_dims[2] == x_dims[2] - 2 && out_dims[3] % kPanelWidth == 0;
}

// y (N, Hp - 2, Wp - 2, C_out) = the 3x3 convolution of x padded (N, Hp, Wp, C), C a multiple of
// 16, with the kernel whose transform `panels` holds.
ffi::Error WinogradConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto p_dims = panels.dimensions();
  const auto y_dims = y->dimensions();
  if (!WinogradOperands(x_dims, y_dims) || p_dims.size() != 4 || p_dims[0] != 16 ||
      p_dims[2] != x_dims[3] || p_dims[3] != kPanelWidth || y_dims[3] != p_dims[1] * kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels winograd_conv: expected x (N, Hp, Wp, C), C a multiple of 16, panels (16, "
        "C_out / 32, C, 32) and y (N, Hp - 2, Wp - 2, C_out)");
  }
  const WinogradTiles g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], y_dims[1], y_dims[2]};
  const int64_t c = g.c, c_out = y_dims[3], panel_count = p_dims[1], tiles = g.Count();
  const float* x_data = x.typed_data();
  const float* panel_data = panels.typed_data();
  float* y_data = y->typed_data();
  const int64_t tasks = (tiles + kWinogradTiles - 1) / kWinogradTiles;
  ParallelFor(pool, tasks, [=](int64_t task) {
    thread_local std::vector<float> v_buffer, m_buffer;
    v_buffer.resize(16 * kWinogradTiles * c);
    m_buffer.resize(16 * kWinogradTiles * c_out);
    float* v_data = v_buffer.data();
    float* m_data = m_buffer.data();
    const int64_t first = task * kWinogradTiles;
    const int64_t count = std::min(kWinogradTiles, tiles - first);
    TransformPatches(g, x_data, first, count, v_data, kWinogradTiles);
    for (int64_t e = 0; e < 16; ++e) {
      const float* v_rows = v_data + e * kWinogradTiles * c;
      float* m_rows = m_data + e * kWinogradTiles * c_out;
      for (int64_t p = 0; p < panel_count; ++p) {
        const float* panel = panel_data + (e * panel_count + p) * c * kPanelWidth;
        for (int64_t m0 = 0; m0 < count; m0 += kMaxRows) {
          const int64_t block = std::min<int64_t>(kMaxRows, count - m0);
          kCachedBlocks[block - 1](v_rows, panel, m_rows, c, c_out, m0, p * kPanelWidth);
        }
      }
    }
    for (int64_t t = 0; t < count; ++t) {
      const int64_t row = g.Row(first + t), col = g.Col(first + t);
      float* out = y_data + ((g.Image(first + t) * g.ho + row) * g.wo + col) * c_out;
      const int rows = std::min<int64_t>(2, g.ho - row), cols = std::min<int64_t>(2, g.wo - col);
      for (int64_t c0 = 0; c0 < c_out; c0 += 16) {
        Vec16 m[16], tile[2][2];
        for (int e = 0; e < 16; ++e) {
          m[e] = Load16Floats(m_data + (e * kWinogradTiles + t) * c_out + c0);
        }
        TileTransform(m, tile);
        for (int i = 0; i < rows; ++i) {
          for (int j = 0; j < cols; ++j) {
            *reinterpret_cast<Vec16*>(out + (i * g.wo + j) * c_out + c0) = tile[i][j];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// A dy (2 x 2 outputs of a tile, 16 channels per vector) A^T → s[4 row + col], 4 x 4: the
// transposed TileTransform.
inline void TileGradTransform(const Vec16 dy[2][2], Vec16 s[16]) {
  Vec16 t[4][2];
  for (int col = 0; col < 2; ++col) {
    t[0][col] = dy[0][col];
    t[1][col] = dy[0][col] + dy[1][col];
    t[2][col] = dy[0][col] - dy[1][col];
    t[3][col] = -dy[1][col];
  }
  for (int row = 0; row < 4; ++row) {
    s[4 * row + 0] = t[row][0];
    s[4 * row + 1] = t[row][0] + t[row][1];
    s[4 * row + 2] = t[row][0] - t[row][1];
    s[4 * row + 3] = -t[row][1];
  }
}

// G^T s G: the 4 x 4 sums s[4 row + col] → the kernel's 3 x 3 gradient w[row][col].
inline void KernelGradTransform(const Vec16 s[16], Vec16 w[3][3]) {
  Vec16 t[3][4];
  for (int col = 0; col < 4; ++col) {
    t[0][col] = s[col] + 0.5f * (s[4 + col] + s[8 + col]);
    t[1][col] = 0.5f * (s[4 + col] - s[8 + col]);
    t[2][col] = 0.5f * (s[4 + col] + s[8 + col]) + s[12 + col];
  }
  for (int row = 0; row < 3; ++row) {
    w[row][0] = t[row][0] + 0.5f * (t[row][1] + t[row][2]);
    w[row][1] = 0.5f * (t[row][1] - t[row][2]);
    w[row][2] = 0.5f * (t[row][1] + t[row][2]) + t[row][3];
  }
}

constexpr int64_t kWinogradGradTiles = 48;
constexpr int64_t kWinogradGradChunksPerThread = 2;

// dw (3, 3, C, C_out) of WinogradConv's convolution for dy (N, Hp - 2, Wp - 2, C_out), by the
// same transform backwards: with U = G g G^T and the tile's outputs A^T (U ⊙ V) A, the kernel's
// gradient is G^T [Σ over tiles of V ⊙ (A dy A^T)] G (dy zero past the map's edge). Tasks are
// chunks of tiles, each summing S (16, C, C_out) of its own (added up at the end); within one,
// kWinogradGradTiles tiles at a time have their V (16, tiles, C) and A dy A^T (16, tiles, C_out)
// made in cache, and KernelGradBlock sums their products into S.
ffi::Error WinogradKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  const auto x_dims = x.dimensions();
  const auto dy_dims = dy.dimensions();
  const auto w_dims = dw->dimensions();
  if (!WinogradOperands(x_dims, dy_dims) || w_dims.size() != 4 || w_dims[0] != 3 ||
      w_dims[1] != 3 || w_dims[2] != x_dims[3] || w_dims[3] != dy_dims[3]) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels winograd_kernel_grad: expected x (N, Hp, Wp, C), C a multiple of 16, dy "
        "(N, Hp - 2, Wp - 2, C_out), C_out a multiple of 32, and dw (3, 3, C, C_out)");
  }
  const WinogradTiles g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], dy_dims[1], dy_dims[2]};
  const int64_t c = g.c, c_out = dy_dims[3], tiles = g.Count(), size = 16 * c * c_out;
  const int64_t most_chunks = kWinogradGradChunksPerThread * (pool.num_threads() + 1);
  const int64_t chunks = std::clamp<int64_t>(tiles / kWinogradGradTiles, 1, most_chunks);
  std::vector<float> sums(chunks * size, 0.0f);
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  float* sum_data = sums.data();
  ParallelFor(pool, chunks, [=](int64_t chunk) {
    thread_local std::vector<float> v_buffer, dy_buffer;
    v_buffer.resize(16 * kWinogradGradTiles * c);
    dy_buffer.resize(16 * kWinogradGradTiles * c_out);
    float* v_data = v_buffer.data();
    float* transformed_dy = dy_buffer.data();
    float* s_data = sum_data + chunk * size;
    int64_t v_offsets[kWinogradGradTiles], dy_offsets[kWinogradGradTiles];
    for (int64_t t = 0; t < kWinogradGradTiles; ++t) {
      v_offsets[t] = t * c;
      dy_offsets[t] = t * c_out;
    }
    const int64_t end = (chunk + 1) * tiles / chunks;
    for (int64_t first = chunk * tiles / chunks; first < end; first += kWinogradGradTiles) {
      const int64_t count = std::min(kWinogradGradTiles, end - first);
      TransformPatches(g, x_data, first, count, v_data, kWinogradGradTiles);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t row = g.Row(first + t), col = g.Col(first + t);
        const float* grads = dy_data + ((g.Image(first + t) * g.ho + row) * g.wo + col) * c_out;
        const int out_rows = std::min<int64_t>(2, g.ho - row);
        const int out_cols = std::min<int64_t>(2, g.wo - col);
        for (int64_t c0 = 0; c0 < c_out; c0 += 16) {
          Vec16 tile[2][2], s[16];
          for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
              tile[i][j] = i < out_rows && j < out_cols
                               ? Load16Floats(grads + (i * g.wo + j) * c_out + c0)
                               : Vec16{};
            }
          }
          TileGradTransform(tile, s);
          for (int e = 0; e < 16; ++e) {
            float* to = transformed_dy + (e * kWinogradGradTiles + t) * c_out + c0;
            *reinterpret_cast<Vec16*>(to) = s[e];
          }
        }
      }
      for (int64_t e = 0; e < 16; ++e) {
        const float* v_rows = v_data + e * kWinogradGradTiles * c;
        const float* dy_rows = transformed_dy + e * kWinogradGradTiles * c_out;
        for (int64_t c0 = 0; c0 < c; c0 += kMaxRows) {
          const int64_t block = std::min<int64_t>(kMaxRows, c - c0);
          float* out = s_data + (e * c + c0) * c_out;
          for (int64_t col = 0; col < c_out; col += kPanelWidth) {
            kKernelGradBlocks[block - 1](v_rows + c0, v_offsets, dy_rows + col, dy_offsets, count,
                                         out + col, c_out);
          }
        }
      }
    }
  });
  AddPartials(pool, sum_data, sum_data + size, chunks, size);
  float* w = dw->typed_data();
  ParallelFor(pool, c, [=](int64_t channel) {
    for (int64_t c0 = 0; c0 < c_out; c0 += 16) {
      Vec16 s[16], kernel[3][3];
      for (int e = 0; e < 16; ++e) s[e] = Load16Floats(sum_data + (e * c + channel) * c_out + c0);
      KernelGradTransform(s, kernel);
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          *reinterpret_cast<Vec16*>(w + ((i * 3 + j) * c + channel) * c_out + c0) = kernel[i][j];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// WinogradConv's panels (16, C_out / 32, C, 32) of a (3, 3, C, C_out) kernel g: U = G g G^T per
// channel pair, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]; with `mirror`,
// those of the input gradient's kernel (mirrored in space, channel axes swapped), (16, C / 32,
// C_out, 32). (An einsum in XLA took 60 ms of thread time per training step.) A task per input
// channel of the transformed kernel.
ffi::Error WinogradPanels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> kernel,
                          ffi::ResultBuffer<ffi::F32> panels, bool mirror) {
  const auto w_dims = kernel.dimensions();
  const auto p_dims = panels->dimensions();
  const bool four_dims = w_dims.size() == 4 && p_dims.size() == 4;
  const int64_t c_in = !four_dims ? 0 : mirror ? w_dims[3] : w_dims[2];
  const int64_t c_out = !four_dims ? 0 : mirror ? w_dims[2] : w_dims[3];
  if (!four_dims || w_dims[0] != 3 || w_dims[1] != 3 || p_dims[0] != 16 ||
      p_dims[1] * kPanelWidth != c_out || p_dims[2] != c_in || p_dims[3] != kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels winograd_panels: expected kernel (3, 3, C, C_out), C_out a multiple of 32, "
        "and panels (16, C_out / 32, C, 32) (C and C_out swapped when mirrored)");
  }
  const float* w = kernel.typed_data();
  float* out = panels->typed_data();
  const int64_t panel_count = p_dims[1];
  ParallelFor(pool, c_in, [=](int64_t a) {
    for (int64_t b = 0; b < c_out; ++b) {
      // g[i][j]: the transformed kernel's tap (i, j) from input channel a to output channel b.
      float g[3][3], t[4][3];
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          g[i][j] = mirror ? w[((2 - i) * 3 + (2 - j)) * w_dims[2] * w_dims[3] + b * w_dims[3] + a]
                           : w[(i * 3 + j) * w_dims[2] * w_dims[3] + a * w_dims[3] + b];
        }
      }
      for (int j = 0; j < 3; ++j) {
        t[0][j] = g[0][j];
        t[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
        t[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]);
        t[3][j] = g[2][j];
      }
      float* panel = out + (b / kPanelWidth * c_in + a) * kPanelWidth + b % kPanelWidth;
      const int64_t element_stride = panel_count * c_in * kPanelWidth;
      for (int r = 0; r < 4; ++r) {
        const float u[4] = {t[r][0], 0.5f * (t[r][0] + t[r][1] + t[r][2]),
                            0.5f * (t[r][0] - t[r][1] + t[r][2]), t[r][2]};
        for (int col = 0; col < 4; ++col) panel[(4 * r + col) * element_stride] = u[col];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxWinogradConv, WinogradConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxWinogradKernelGrad, WinogradKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxWinogradPanels, WinogradPanels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("mirror"));

}  // namespace dpjax
