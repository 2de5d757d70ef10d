@echo off
rem Draw FCOS detections on COCO val2017 images (README, "Image demo"): double-click, or run it in a
rem command window. Needs the seed's pretrained file in pretrained_weights\ (see pretrained_weights\README.md).
rem The pictures go to output\demo; the glob takes the val2017 images whose id is below 1000.

rem ---- The only lines to edit: where Anaconda is, the conda environment, the datasets folder ----
set "ANACONDA_ROOT=C:\ProgramData\Anaconda3"
set "ENV_NAME=detectron2_custom"
set "DATASETS_ROOT=D:\datasets"
rem -------------------------------------------------------------------------------------------------

cd /d "%~dp0"
call "%ANACONDA_ROOT%\Scripts\activate.bat" "%ENV_NAME%"
if errorlevel 1 goto activate_failed

python demo/demo.py ^
  --config-file configs/fcos_R_50_FPN.yaml ^
  --input "%DATASETS_ROOT%/coco/val2017/000000000*.jpg" ^
  --output output/demo ^
  --confidence-threshold 0.5 ^
  --opts MODEL.WEIGHTS pretrained_weights/FCOS_imprv_R_50_FPN_1x.pth
if errorlevel 1 goto failed
echo Done: the pictures are in output\demo
pause
exit /b 0

:activate_failed
echo Could not activate the conda environment "%ENV_NAME%" of "%ANACONDA_ROOT%": edit the lines at the top of this file.
pause
exit /b 1

:failed
echo The demo stopped with an error: see the message above.
pause
exit /b 1
