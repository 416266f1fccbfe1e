// Checks and times the code generated_conv_asm.py wrote, over a batch of 32 (two groups of 16 images in the lanes),
// one thread, one input row a call. Not part of vpns_fast: see README.md here.
//
//   python3 bench/prototypes/generated_conv_asm.py 512 2048 1 7 --out /tmp/g.s && as /tmp/g.s -o /tmp/g.o
//   g++ -O2 -std=c++17 bench/prototypes/generated_conv_run.cpp /tmp/g.o -o /tmp/g && /tmp/g 512 2048 1 7 /tmp/g.s
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

extern "C" void generated(const float* x, float* y, const float* w, long count);

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s C_IN C_OUT K H FILE.s\n", argv[0]);
    return 2;
  }
  const int c_in = std::atoi(argv[1]), c_out = std::atoi(argv[2]), k = std::atoi(argv[3]), h = std::atoi(argv[4]);
  const std::string path = argv[5];
  const int padded = h + 2 * (k / 2);
  std::vector<float> table;
  {
    std::ifstream file(path + ".table");
    long count = 0;
    file >> count;
    table.resize(count);
    for (float& value : table) {
      double read = 0;
      file >> read;
      value = static_cast<float>(read);
    }
  }
  std::vector<std::vector<std::pair<long, float>>> rows;
  {
    std::ifstream file(path + ".rows");
    std::string line;
    while (std::getline(file, line)) {
      std::istringstream fields(line);
      std::string field;
      rows.emplace_back();
      while (fields >> field) {
        const auto colon = field.find(':');
        rows.back().emplace_back(std::stol(field.substr(0, colon)), static_cast<float>(std::stod(field.substr(colon + 1))));
      }
    }
  }
  constexpr int kGroups = 2;  // batch 32
  const long in_group = static_cast<long>(c_in) * padded * padded * 16 + 64 * 16;  // + the last row's overreach
  const long out_group = static_cast<long>(c_out) * h * h * 16;
  auto* x = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kGroups * in_group));
  auto* y = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kGroups * out_group));
  for (long i = 0; i < kGroups * in_group; ++i) x[i] = static_cast<float>((i * 7919) % 1000) * 0.001f - 0.5f;
  auto call = [&] {
    for (int g = 0; g < kGroups; ++g) {
      for (int i = 0; i < h; ++i) {
        generated(x + g * in_group + static_cast<long>(i) * padded * 16, y + g * out_group + static_cast<long>(i) * h * 16,
                  table.data(), h);
      }
    }
  };
  call();
  double worst = 0;
  for (int t = 0; t < 500; ++t) {
    const int g = t % kGroups, o = (t * 37) % c_out, i = (t * 13) % h, j = (t * 5) % h, lane = t % 16;
    double sum = 0;
    for (const auto& [offset, weight] : rows[o]) sum += weight * x[g * in_group + (static_cast<long>(i) * padded + j) * 16 + offset + lane];
    worst = std::max(worst, std::fabs(sum - y[g * out_group + static_cast<long>(o) * h * h * 16 + (i * h + j) * 16 + lane]));
  }
  std::vector<double> ms;
  for (int r = 0; r < 9; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  long nonzeros = 0;
  for (const auto& row : rows) nonzeros += static_cast<long>(row.size());
  std::printf("generated %d->%d %dx%d at %dx%d: max |error| %.2g against a float64 sum, %.2f ms (min %.2f), %.1f GFLOP/s\n",
              c_in, c_out, k, k, h, h, worst, ms[4], ms[0], 2.0 * nonzeros * 32 * h * h / ms[4] / 1e6);
  return worst < 1e-4 ? 0 : 1;
}
